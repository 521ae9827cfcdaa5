"""Fixtures for the model-task tests: the extractive engine (loaded once) and DocumentText builders.

document_from_pages builds small hand-made documents; parsed_document runs real corpus PDFs through
the real parse + chunk path, as a worker does.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.types import Chunk, DocumentText, PageSpan

PAGE_SEPARATOR = "\n\n"


def document_from_pages(pages: list[str], *, chunk_words: int = 200, separator: str = PAGE_SEPARATOR
                        ) -> DocumentText:
    """A DocumentText whose page i+1 holds pages[i]; chunks are word windows that never cross pages."""
    parts, spans, chunks, pos = [], [], [], 0
    for number, page in enumerate(pages, start=1):
        if parts:
            parts.append(separator)
            pos += len(separator)
        spans.append(PageSpan(number, pos, pos + len(page)))
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", page)]
        for w in range(0, len(words), chunk_words):
            window = words[w:w + chunk_words]
            a, b = pos + window[0][0], pos + window[-1][1]
            chunks.append(Chunk(len(chunks), page[window[0][0]:window[-1][1]], len(window), number, number, a, b))
        parts.append(page)
        pos += len(page)
    full_text = "".join(parts)
    return DocumentText(full_text, spans, chunks, token_count=len(full_text.split()))


def parsed_document(path: Path, *, first_pages: int | None = None) -> DocumentText:
    """The real path a worker takes: pipeline.parse.parse_file, then pipeline.chunk with the tokenizer
    tokenizer_spec names for the extractive engine (optionally keeping only the first pages)."""
    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file
    from pipeline.tasks import tokenizer_spec
    from pipeline.tokens import load_tokenizer

    parsed = parse_file(path, limits=ParseLimits(max_pages=500, timeout_s=120, memory_mb=2048))
    spec = tokenizer_spec("extractive", model="unused", embedding_model="all-MiniLM-L6-v2")
    return build_document_text(parsed.pages[:first_pages], tokenizer=load_tokenizer(spec),
                               chunk_tokens=256, overlap_tokens=32)


def normalized(text: str) -> str:
    return " ".join(text.split())


def pages_text(doc: DocumentText, first: int, last: int) -> str:
    """Whitespace-normalized text of pages first..last, for checking that a citation is real."""
    spans = [s for s in doc.page_spans if first <= s.number <= last]
    return normalized(" ".join(doc.full_text[s.char_start:s.char_end] for s in spans))


@pytest.fixture(scope="session")
def extractive_engine():
    """The real all-MiniLM-L6-v2 engine, loaded once per test session (a few seconds on CPU)."""
    from pipeline.tasks import load_engine

    return load_engine("extractive", model="unused", device="cpu", embedding_model="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def cybergy_doc(corpus_dir: Path) -> DocumentText:
    return parsed_document(corpus_dir / "contract-cybergy-affiliate.pdf")
