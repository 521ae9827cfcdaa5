"""Fixtures for the model-task tests: the extractive engine (loaded once) and DocumentText builders.

The builders are deliberately small and independent of pipeline.chunk so the task tests do not wait
on the parser; one test in test_tasks_real.py goes through the real parse + chunk path instead.
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


def clean_page_text(raw: str) -> str:
    """Roughly what a parser does: unify newlines, turn no-break spaces into spaces."""
    return raw.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ").replace("\xad", "-")


def pdf_pages(path: Path, max_pages: int | None = None) -> list[str]:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        count = len(pdf) if max_pages is None else min(len(pdf), max_pages)
        return [clean_page_text(pdf[i].get_textpage().get_text_range()) for i in range(count)]
    finally:
        pdf.close()


def document_from_pdf(path: Path, max_pages: int | None = None) -> DocumentText:
    return document_from_pages(pdf_pages(path, max_pages))


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
    return document_from_pdf(corpus_dir / "contract-cybergy-affiliate.pdf")
