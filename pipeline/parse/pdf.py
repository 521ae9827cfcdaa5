"""PDF -> raw page texts, page labels and outline headings. PDFium (pypdfium2) by default; pypdf as
the fallback when PDFium cannot open a file, or when settings.pdf_extractor = "pypdf".

Runs inside the parser child process (pipeline.parse.child), never in a worker directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from pipeline.types import PipelineError

if TYPE_CHECKING:
    import pypdf

log = logging.getLogger(__name__)

EXTRACTORS = ("pdfium", "pypdf")
MAX_OUTLINE_TITLES = 10_000
MAX_OUTLINE_DEPTH = 15


@dataclass
class RawPage:
    text: str
    label: str | None = None
    has_images: bool = False  # a page without text but with images needs OCR


@dataclass
class RawDocument:
    pages: list[RawPage]
    warnings: list[str]
    headings: set[str]  # outline titles, used to mark heading lines for the chunker


def extract_pdf(path: Path, *, password: str | None, extractor: str, max_pages: int) -> RawDocument:
    """Page texts, labels and outline headings of a PDF.

    Default ("pdfium"): PDFium reads everything; it opens empty-user-password files by itself and
    reports a missing or wrong password, which becomes password_required / wrong_password. pypdf
    is opened only when PDFium cannot open a file (fallback extractor) or when `extractor` is
    "pypdf"; then pypdf also settles the password and reads labels and outline. Opening pypdf on
    every file would cost 12% of PDFium's own extraction time on the corpus (bench/parse.py).
    """
    if extractor not in EXTRACTORS:
        raise PipelineError("invalid_params", f"unknown pdf extractor {extractor!r}; use one of {EXTRACTORS}")
    if extractor == "pdfium":
        try:
            return _pdfium_document(path, password, max_pages)
        except pdfium.PdfiumError as exc:
            if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD:
                raise _password_error(password) from exc
            reader = _open_pypdf(path, password)
            if reader is None:
                raise PipelineError("parse_error", f"not a readable PDF: {exc}") from exc
            warning = f"PDFium could not read the file ({exc}); extracted with pypdf"
    else:
        reader = _open_pypdf(path, password)
        if reader is None:
            raise PipelineError("parse_error", "not a readable PDF (pypdf could not open it)")
        warning = None
    warnings = [warning] if warning else []
    pages = _pypdf_pages(reader, max_pages)
    _apply_pypdf_labels(reader, pages, warnings)
    return RawDocument(pages, warnings, _pypdf_outline_titles(reader, warnings))


def _password_error(password: str | None) -> PipelineError:
    if password is None:
        return PipelineError("password_required", "the PDF is encrypted; upload it again with its password")
    return PipelineError("wrong_password", "the password given does not open this PDF")


def _open_pypdf(path: Path, password: str | None) -> pypdf.PdfReader | None:
    """Open with pypdf and settle encryption; None when pypdf cannot parse the file at all.

    Empty-user-password files (most encrypted SEC filings) open without a password. A file that
    needs one fails password_required, or wrong_password when the one given does not open it.
    """
    import pypdf  # here, not at module level: the parser child's start paid ~0.09 s for a fallback

    try:
        reader = pypdf.PdfReader(path, strict=False)
        encrypted = reader.is_encrypted
    except pypdf.errors.PyPdfError as exc:
        log.info("pypdf cannot open %s: %s", path.name, exc)
        return None
    if not encrypted:
        return reader
    if reader.decrypt("") != pypdf.PasswordType.NOT_DECRYPTED:
        return reader
    if password is None or reader.decrypt(password) == pypdf.PasswordType.NOT_DECRYPTED:
        raise _password_error(password)
    return reader


def _check_page_count(count: int, max_pages: int) -> None:
    if count > max_pages:
        raise PipelineError("too_many_pages", f"the document has {count} pages; the limit is {max_pages}")


def _pdfium_document(path: Path, password: str | None, max_pages: int) -> RawDocument:
    doc = pdfium.PdfDocument(str(path), password=password or None)
    try:
        _check_page_count(len(doc), max_pages)
        pages = []
        for index in range(len(doc)):
            page = doc[index]
            textpage = page.get_textpage()
            text = textpage.get_text_range()
            textpage.close()
            has_images = not text.strip() and _pdfium_has_images(page)
            page.close()
            pages.append(RawPage(text, label=doc.get_page_label(index) or None, has_images=has_images))
        return RawDocument(pages, [], _pdfium_outline_titles(doc))
    finally:
        doc.close()


def _pdfium_outline_titles(doc: pdfium.PdfDocument) -> set[str]:
    titles: set[str] = set()
    try:
        for bookmark in doc.get_toc(max_depth=MAX_OUTLINE_DEPTH):  # pypdfium2 stops at cycles
            titles.add(" ".join(bookmark.get_title().split()).lower())
            if len(titles) >= MAX_OUTLINE_TITLES:
                break
    except Exception:  # noqa: BLE001 - a broken outline costs heading hints, not the document
        log.info("outline unreadable", exc_info=True)
    return titles


def _pdfium_has_images(page: pdfium.PdfPage) -> bool:
    return any(True for _ in page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_IMAGE,), max_depth=3))


def _pypdf_pages(reader: pypdf.PdfReader, max_pages: int) -> list[RawPage]:
    import pypdf

    try:
        count = len(reader.pages)
    except pypdf.errors.PyPdfError as exc:
        raise PipelineError("parse_error", f"cannot read the page tree: {exc}") from exc
    _check_page_count(count, max_pages)
    pages = []
    for index in range(count):
        page = reader.pages[index]
        try:
            text = page.extract_text()
        except pypdf.errors.PyPdfError as exc:
            raise PipelineError("parse_error", f"page {index + 1}: {exc}") from exc
        pages.append(RawPage(text, has_images=not text.strip() and _pypdf_has_images(page)))
    return pages


def _pypdf_has_images(page: pypdf.PageObject) -> bool:
    try:
        return len(page.images) > 0
    except Exception:  # noqa: BLE001 - a broken image dictionary must not fail the page's text
        return False


def _apply_pypdf_labels(reader: pypdf.PdfReader, pages: list[RawPage], warnings: list[str]) -> None:
    """Set each page's label from the PDF's /PageLabels; pages keep None where none is defined."""
    try:
        if "/PageLabels" not in reader.root_object:
            return
        labels = reader.page_labels
    except Exception as exc:  # noqa: BLE001 - labels are optional; the text is what matters
        warnings.append(f"page labels unreadable: {exc}")
        return
    for page, label in zip(pages, labels, strict=False):
        page.label = label or None


def _pypdf_outline_titles(reader: pypdf.PdfReader, warnings: list[str]) -> set[str]:
    titles: set[str] = set()
    try:
        stack = list(reader.outline)
        while stack and len(titles) < MAX_OUTLINE_TITLES:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
            elif getattr(item, "title", None):
                titles.add(" ".join(str(item.title).split()).lower())
    except Exception as exc:  # noqa: BLE001 - a broken outline costs headings, not the document
        warnings.append(f"outline unreadable: {exc}")
    return titles


def mark_headings(text: str, headings: set[str]) -> str:
    """Put a blank line before lines that are outline headings so the chunker can break there."""
    if not headings:
        return text
    lines = text.split("\n")
    out = []
    for line in lines:
        if out and out[-1].strip() and " ".join(line.split()).lower() in headings:
            out.append("")
        out.append(line)
    return "\n".join(out)
