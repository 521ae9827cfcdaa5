"""Retrieval for the MPT strategies over the shared retrieval module (pipeline/tasks/retrieval.py:
stemmed BM25, fused with sentence-embedding cosine when the engine has an embedder).

    ChunkIndex(s, chunks).rank(query) -> [Chunk], every chunk, best first    (what to pack for a question)
    SentenceIndex.of(s, doc).top(query, k, within=spans) -> [Evidence], best first  (what supports a text;
        built once per document for all its tasks)
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.tasks.mpt.common import Session
from pipeline.tasks.retrieval import SHORTLIST, Retriever, document_passages
from pipeline.types import Chunk, DocumentText

# a sentence runs to . ! ? before whitespace (not "3.5" or "U.S"), or to the end of its line
_SENTENCE = re.compile(r"\S(?:[^\n.!?]|[.!?](?![.!?]*(?:\s|$)))*(?:[.!?]+|\n|$)")
MIN_SENTENCE_CHARS = 20  # a shorter piece of generated text (a heading, "Yes.") is joined to the next


@dataclass(frozen=True)
class Evidence:
    text: str  # whitespace-normalized
    char_start: int
    char_end: int
    page_start: int
    page_end: int
    score: float  # the retrieval module's fused score (0..1)


class ChunkIndex:
    def __init__(self, s: Session, chunks: Sequence[Chunk]) -> None:
        self.chunks = list(chunks)
        self._retriever = Retriever([c.text for c in self.chunks], embedder=s.embedder)

    def rank(self, query: str) -> list[Chunk]:
        """Every chunk: the retrieved ones best first, then the rest in document order."""
        hits = self._retriever.search(query, k=len(self.chunks))
        seen = {h.index for h in hits}
        rest = sorted((i for i in range(len(self.chunks)) if i not in seen), key=lambda i: self.chunks[i].char_start)
        return [self.chunks[i] for i in [*(h.index for h in hits), *rest]]


class SentenceIndex:
    def __init__(self, s: Session, doc: DocumentText) -> None:
        self.passages = document_passages(doc, "sentence")
        self._retriever = Retriever([p.text for p in self.passages], embedder=s.embedder)

    @classmethod
    def of(cls, s: Session, doc: DocumentText) -> SentenceIndex:
        """The index of `doc`, built once for all its tasks (QA's evidence and the summary's citations
        each built one: 40-100 ms of Python holding the GIL per 14K-38K-token document, during which
        the serving engine's thread barely runs)."""
        key = (id(doc), id(s.embedder))
        with _INDEX_LOCK:
            hit = _INDEXES.get(key)
            if hit is not None and hit[0]() is doc and hit[1] is s.embedder:
                _INDEXES.move_to_end(key)
                return hit[2]
        index = cls(s, doc)  # outside the lock: another document's tasks need not wait for this one
        with _INDEX_LOCK:
            _INDEXES[key] = (weakref.ref(doc), s.embedder, index)
            while len(_INDEXES) > _INDEXES_KEPT:
                _INDEXES.popitem(last=False)
        return index

    def top(self, query: str, k: int, within: Sequence[tuple[int, int]] | None = None) -> list[Evidence]:
        """The `k` best sentences for `query`, only those inside `within` spans when given."""
        out: list[Evidence] = []
        for hit in self._retriever.search(query, k=max(k, SHORTLIST)):
            p = self.passages[hit.index]
            if within is None or any(a <= p.char_start and p.char_end <= b for a, b in within):
                out.append(Evidence(p.text, p.char_start, p.char_end, p.page_start, p.page_end, hit.score))
            if len(out) == k:
                break
        return out


_INDEXES_KEPT = 8  # documents in flight in one process, with room to spare
_INDEX_LOCK = threading.Lock()
# id(doc), id(embedder) -> (the document, weakly: an id may be reused once it is gone; embedder; index)
_INDEXES: OrderedDict[tuple[int, int], tuple[weakref.ref, Any, SentenceIndex]] = OrderedDict()


def sentences(text: str) -> list[tuple[int, int]]:
    """Sentence-sized character spans of generated text (short pieces joined to the next)."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    end = 0
    for m in _SENTENCE.finditer(text):
        end = m.start() + len(m.group().rstrip())
        start = m.start() if start is None else start
        if end - start >= MIN_SENTENCE_CHARS:
            out.append((start, end))
            start = None
    if start is not None:  # a short tail: part of the last sentence, or on its own
        out[-1:] = [(out[-1][0], end)] if out else [(start, end)]
    return out
