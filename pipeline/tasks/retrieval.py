"""Shared retrieval: BM25 (bm25s) over a document's sentences or chunks, fused with sentence-embedding
cosine when an embedder is given. Used by the extractive strategies and by the MPT strategies (which
chunks to pack for a question, which passages support a generated sentence).

    passages = document_passages(doc, unit="sentence")           # or "chunk"; char offsets + pages
    retriever = Retriever([p.text for p in passages], embedder=backend)
    hits = retriever.search("Which state's law governs?", k=5)   # [Hit(index, score, bm25, cosine)]
    passages[hits[0].index]                                      # -> text, char span, pages

BM25 narrows what gets embedded: only the `shortlist` best BM25 texts per query are embedded (the
embedder is expected to cache vectors, as the extractive backend does), then ranked by
`bm25_weight * bm25/max(bm25) + (1 - bm25_weight) * max(cosine, 0)` (normalized score fusion) or by
reciprocal-rank fusion. When no query term occurs in the texts, every text is a candidate (up to
MAX_FALLBACK), so a paraphrased question still finds its passage. Torch-free: the embedder brings torch.
"""

from __future__ import annotations

import functools
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from types import ModuleType
from typing import Literal, Protocol

import numpy as np

from pipeline.types import DocumentText


def _import_bm25s_without_jax() -> ModuleType:
    """bm25s.selection imports JAX when it is installed and runs a top-k at import time, which starts
    JAX's GPU client, and that preallocates 75% of the GPU's memory: on a gpu worker (or the H200
    bench: 105 of 140 GiB) the serving engine's KV pool then gets what is left. BM25's top-k is tiny
    numpy work; JAX is made unimportable for that one import so bm25s takes its numpy path."""
    if "bm25s" in sys.modules or "jax" in sys.modules:  # already decided by an earlier import
        import bm25s

        return bm25s
    sys.modules["jax"] = None  # type: ignore[assignment]  # `import jax` -> ImportError
    try:
        import bm25s
    finally:
        del sys.modules["jax"]
    return bm25s


bm25s = _import_bm25s_without_jax()

SHORTLIST = 32  # texts embedded per query: BM25's best
BM25_WEIGHT = 0.5
RRF_K = 60  # the usual reciprocal-rank-fusion constant
MAX_FALLBACK = 2000  # a query with no term in the document is compared with at most this many texts
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
# "non-compete", "sub-license"; a match starts only where a word does (the look-behind spares the scan
# a retry at every letter of every word: 2x faster, the same matches)
_COMPOUND = re.compile(r"(?<![^\W\d_])[^\W\d_]+(?:[-\u2010\u2011][^\W\d_]+)+", re.UNICODE)
_STOP_WORDS = (
    "a an and are as at be been by can could did do does for from had has have how i if in into is it its "
    "may might must no not of on or our shall should so such than that the their them then there these "
    "they this those to under upon was we were what when where which while who whom whose why will with "
    "would you your")
_STOP = frozenset(_STOP_WORDS.split())
_HYPHENS = re.compile(r"[-\u2010\u2011]")


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized embeddings [N, D] in the order of `texts`."""


@dataclass(frozen=True)
class Hit:
    index: int  # position in the texts the Retriever was built on
    score: float  # the fused score (normalized fusion: 0..1; rrf: rank-based)
    bm25: float  # BM25 relative to the query's best text, 0..1
    cosine: float | None  # embedding cosine, None without an embedder


@dataclass(frozen=True)
class Passage:
    """A citable piece of the document: full_text[char_start:char_end] on pages page_start..page_end."""

    text: str  # whitespace-normalized
    char_start: int
    char_end: int
    page_start: int
    page_end: int


@functools.lru_cache(maxsize=1)
def _stemmer():  # noqa: ANN202 - PyStemmer's Stemmer
    import Stemmer

    return Stemmer.Stemmer("english")


def terms(text: str) -> list[str]:
    """BM25 terms: lowercased words without stop words, Snowball-stemmed ("governs", "governing" and
    "governed" meet). Numbers stay: "30" and "2022" are often what a question is about. A hyphenated
    compound is also one term of its own ("non-compete" -> "non", "compet", "noncompet"), so that it
    matches itself more than the many "non-..." words it shares a part with."""
    lowered = text.lower()
    # single letters are possessive "s", list markers and initials, not terms; single digits stay
    words = [w for w in _TOKEN.findall(lowered) if w not in _STOP and (len(w) > 1 or w.isdigit())]
    if "-" in lowered or "\u2010" in lowered or "\u2011" in lowered:
        words += [_HYPHENS.sub("", c) for c in _COMPOUND.findall(lowered)]
    return _stemmer().stemWords(words)


class Bm25:
    """BM25 over fixed texts; scores(query) -> [N] raw scores, zeros when no query term occurs."""

    def __init__(self, texts: Sequence[str], *, corpus_terms: Sequence[list[str]] | None = None) -> None:
        """corpus_terms: the texts' terms when the caller has them already (saves the stemming)."""
        self.n = len(texts)
        corpus = [terms(t) for t in texts] if corpus_terms is None else list(corpus_terms)
        self.terms = corpus  # per text, for callers building derived indexes
        # texts holding each term (Counter counts in C: the Python loop cost ~10 ms per 800 windows)
        self.df: dict[str, int] = dict(Counter(chain.from_iterable(map(set, corpus))))
        self.vocab = set(self.df)
        self.index = None
        if self.vocab:
            self.index = bm25s.BM25()
            self.index.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        known = [t for t in terms(query) if t in self.vocab]
        if self.index is None or not known:
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self.index.get_scores(known), dtype=np.float32)


class Retriever:
    """Ranks fixed texts for queries: BM25, fused with embedding cosine when an embedder is given."""

    def __init__(self, texts: Sequence[str], *, embedder: Embedder | None = None, shortlist: int = SHORTLIST,
                 bm25_weight: float = BM25_WEIGHT, fusion: Literal["score", "rrf"] = "score") -> None:
        self.texts = list(texts)
        self.bm25 = Bm25(self.texts)
        self.embedder = embedder
        self.shortlist = shortlist
        self.bm25_weight = bm25_weight
        self.fusion = fusion

    def search(self, query: str, k: int = 5) -> list[Hit]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        """The k best texts per query, best first (query embeddings computed in one batch)."""
        if not self.texts:
            return [[] for _ in queries]
        lexical = [self.bm25.scores(q) for q in queries]  # each [N]
        if self.embedder is None:
            return [self._bm25_only(s, k) for s in lexical]
        candidates = [self.candidates(s) for s in lexical]
        wanted = sorted({i for c in candidates for i in c})
        vectors = dict(zip(wanted, self.embedder.embed([self.texts[i] for i in wanted]), strict=True))
        query_vectors = self.embedder.embed(list(queries))  # [Q, D]
        out = []
        for s, cand, qv in zip(lexical, candidates, query_vectors, strict=True):
            cosine = np.array([float(vectors[i] @ qv) for i in cand], dtype=np.float32)
            out.append(self._fuse(s, cand, cosine)[:k])
        return out

    def candidates(self, bm25_scores: np.ndarray) -> list[int]:
        """What gets embedded for a query: its BM25 shortlist, or (no term matched) everything, spread."""
        hits = np.flatnonzero(bm25_scores > 0)
        if len(hits) == 0:
            n = len(self.texts)
            return list(range(n)) if n <= MAX_FALLBACK else sorted(
                {int(i) for i in np.linspace(0, n - 1, MAX_FALLBACK)})
        order = hits[np.argsort(-bm25_scores[hits], kind="stable")]
        return [int(i) for i in order[:self.shortlist]]

    def _bm25_only(self, scores: np.ndarray, k: int) -> list[Hit]:
        top = float(scores.max()) if len(scores) else 0.0
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(i), float(scores[i] / top) if top else 0.0, float(scores[i] / top) if top else 0.0, None)
                for i in order if scores[i] > 0]

    def _fuse(self, scores: np.ndarray, cand: list[int], cosine: np.ndarray) -> list[Hit]:
        top = float(scores.max())
        lexical = scores[cand] / top if top else np.zeros(len(cand), dtype=np.float32)  # [C] in 0..1
        if self.fusion == "rrf":
            lex_rank = np.argsort(np.argsort(-lexical, kind="stable"))
            emb_rank = np.argsort(np.argsort(-cosine, kind="stable"))
            fused = 1.0 / (RRF_K + 1 + lex_rank) + 1.0 / (RRF_K + 1 + emb_rank)
        else:
            fused = self.bm25_weight * lexical + (1 - self.bm25_weight) * np.clip(cosine, 0.0, 1.0)
        order = np.argsort(-fused, kind="stable")
        return [Hit(cand[j], float(fused[j]), float(lexical[j]), float(cosine[j])) for j in order]


def document_passages(doc: DocumentText, unit: Literal["sentence", "chunk"] = "sentence") -> list[Passage]:
    """The document as citable passages with char offsets and pages: sentence-sized segments (the
    extractive segmentation) or the document's chunks."""
    if unit == "chunk":
        return [Passage(" ".join(c.text.split()), c.char_start, c.char_end, c.page_start, c.page_end)
                for c in doc.chunks if c.text.strip()]
    from pipeline.tasks.extractive.segments import split_sentences

    return [Passage(s.text, s.char_start, s.char_end, s.page_start, s.page_end) for s in split_sentences(doc)]


def search_document(doc: DocumentText, query: str, k: int = 5, *, unit: Literal["sentence", "chunk"] = "sentence",
                    embedder: Embedder | None = None) -> list[tuple[Passage, Hit]]:
    """One-shot convenience: the k passages of `doc` that best match `query`, best first."""
    passages = document_passages(doc, unit)
    hits = Retriever([p.text for p in passages], embedder=embedder).search(query, k)
    return [(passages[h.index], h) for h in hits]
