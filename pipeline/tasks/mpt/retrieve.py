"""Retrieval for the MPT strategies: which chunks to pack for a question, which passages support a
generated sentence or answer.

Two indexes, built once per task run, kept small so the shared retrieval module
(pipeline/tasks/retrieval.py: BM25 + embedding fusion) can sit behind them:
    ChunkIndex(s, doc).rank(query) -> [(chunk, score)], best first
    SentenceIndex(s, doc).top(query, k, within=spans) -> [Passage], sentence-sized, best first
Until that module is in place they run BM25 alone (bm25s).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import bm25s
import numpy as np

from pipeline.tasks.mpt.common import Session
from pipeline.types import Chunk, DocumentText

# a sentence runs to . ! ? before whitespace (not "3.5" or "U.S"), or to the end of its line
_SENTENCE = re.compile(r"\S(?:[^\n.!?]|[.!?](?![.!?]*(?:\s|$)))*(?:[.!?]+|\n|$)")
MIN_PASSAGE_CHARS = 20  # a shorter "sentence" (a heading, a page number) is joined to the next


@dataclass(frozen=True)
class Passage:
    text: str  # whitespace-normalized
    char_start: int
    char_end: int
    score: float


class _Bm25:
    """BM25 (bm25s) over fixed texts; score(query) -> [N], zeros when no query term occurs."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.n = len(texts)
        corpus = bm25s.tokenize(list(texts), stopwords="en", show_progress=False) if texts else None
        self.vocab = corpus.vocab if corpus is not None else {}
        self.index = None
        if self.vocab:
            self.index = bm25s.BM25()
            self.index.index(corpus, show_progress=False)

    def score(self, query: str) -> np.ndarray:
        if self.index is None:
            return np.zeros(self.n)
        terms = [t for t in bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
                 if t in self.vocab]
        if not terms:
            return np.zeros(self.n)
        return np.asarray(self.index.get_scores(terms), dtype=np.float64)


class ChunkIndex:
    def __init__(self, s: Session, doc: DocumentText, chunks: Sequence[Chunk]) -> None:
        self.chunks = list(chunks)
        self._bm25 = _Bm25([c.text for c in self.chunks])

    def rank(self, query: str) -> list[tuple[Chunk, float]]:
        """Every chunk by relevance to `query`, best first; ties (e.g. all zero) keep document order."""
        scores = self._bm25.score(query)
        order = sorted(range(len(self.chunks)), key=lambda i: (-scores[i], self.chunks[i].char_start))
        return [(self.chunks[i], float(scores[i])) for i in order]


def sentences(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sentence-sized character spans of `text` inside `spans` (short pieces joined to the next)."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        start: int | None = None
        end = a
        for m in _SENTENCE.finditer(text, a, b):
            end = m.start() + len(m.group().rstrip())
            start = m.start() if start is None else start
            if end - start >= MIN_PASSAGE_CHARS:
                out.append((start, end))
                start = None
        if start is not None:  # a short tail: part of the span's last sentence, or on its own
            if out and out[-1][0] >= a:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


class SentenceIndex:
    def __init__(self, s: Session, doc: DocumentText) -> None:
        self.text = doc.full_text
        self.pieces = sentences(self.text, [(0, len(self.text))])
        self._bm25 = _Bm25([self.text[a:b] for a, b in self.pieces])

    def top(self, query: str, k: int, within: Sequence[tuple[int, int]] | None = None) -> list[Passage]:
        """The `k` best passages for `query` with a score > 0, inside `within` spans when given."""
        scores = self._bm25.score(query)
        hits: list[Passage] = []
        for i in np.argsort(-scores, kind="stable"):
            a, b = self.pieces[i]
            if scores[i] <= 0 or len(hits) >= k:
                break
            if within is None or any(x <= a and b <= y for x, y in within):
                hits.append(Passage(" ".join(self.text[a:b].split()), a, b, float(scores[i])))
        return hits
