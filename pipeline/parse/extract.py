"""One document, in this process: guards, sniff, extract, clean, account for every page.

pipeline.parse.parse_file runs this inside a killable child process; call it directly only where
the input is trusted (tests of the steps themselves, the benchmark's in-process comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.clean import clean_pages
from pipeline.parse import sniff
from pipeline.parse.pdf import RawDocument, RawPage, extract_pdf, mark_headings
from pipeline.types import PageText, ParsedDocument, PipelineError


@dataclass(frozen=True)
class ParseLimits:
    """Per-document limits. max_bytes (optional) is checked before the file is read."""

    max_pages: int
    timeout_s: float
    memory_mb: int
    max_bytes: int | None = None


def parse_in_process(path: Path, *, password: str | None = None, extractor: str = "pdfium",
                     limits: ParseLimits) -> ParsedDocument:
    size = path.stat().st_size
    if size == 0:
        raise PipelineError("empty_file", "the file is empty (0 bytes)")
    if limits.max_bytes is not None and size > limits.max_bytes:
        raise PipelineError("too_large", f"the file has {size} bytes; the limit is {limits.max_bytes}")
    with path.open("rb") as f:
        media_type = sniff.sniff_media_type(f.read(sniff.SNIFF_BYTES))
    if media_type is None:
        raise PipelineError("unsupported_media_type",
                            "not a PDF, plain text, Markdown, HTML or DOCX file (judged by its bytes)")
    raw = _extract(path, media_type, password, extractor, limits.max_pages)
    return _finish(media_type, raw)


def _extract(path: Path, media_type: str, password: str | None, extractor: str, max_pages: int) -> RawDocument:
    if media_type == sniff.PDF:
        return extract_pdf(path, password=password, extractor=extractor, max_pages=max_pages)
    # here, not at module level: html.parser, zipfile and ElementTree cost every parser child ~10 ms at start
    from pipeline.parse.textlike import docx_pages, html_pages, text_pages

    if media_type == sniff.HTML:
        pages = html_pages(path, max_pages)
    elif media_type == sniff.DOCX:
        pages = docx_pages(path, max_pages)
    else:
        pages = text_pages(path, max_pages)
    return RawDocument(pages, [], set())


def _finish(media_type: str, raw: RawDocument) -> ParsedDocument:
    texts, warnings = clean_pages([mark_headings(p.text, raw.headings) for p in raw.pages])
    pages = [_page(number, raw_page, text) for number, (raw_page, text) in
             enumerate(zip(raw.pages, texts, strict=True), start=1)]
    warnings = raw.warnings + warnings
    doc = ParsedDocument(media_type=media_type, pages=pages, warnings=warnings)
    if doc.needs_ocr_pages:
        warnings.append(f"{doc.needs_ocr_pages} of {len(pages)} pages have no text layer (need OCR)")
    if not any(p.text for p in pages):
        raise PipelineError(
            "no_text_layer",
            f"none of the {len(pages)} pages has extractable text"
            + (f" ({doc.needs_ocr_pages} are images: the document needs OCR)" if doc.needs_ocr_pages else ""),
        )
    return doc


def _page(number: int, raw: RawPage, text: str) -> PageText:
    return PageText(number=number, text=text, label=raw.label, needs_ocr=not text and raw.has_images)
