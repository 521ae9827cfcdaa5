"""Plain text, Markdown, HTML and DOCX -> raw page texts.

Text has no pages of its own: a form feed starts a new page; without form feeds the text is cut
into virtual pages of about VIRTUAL_PAGE_CHARS at the nearest paragraph or line break, so page
citations still point somewhere useful.
"""

from __future__ import annotations

import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

from pipeline.parse.pdf import RawPage
from pipeline.types import PipelineError

VIRTUAL_PAGE_CHARS = 3000
# A DOCX's document.xml larger than this (uncompressed) is refused before it is inflated.
MAX_DOCX_XML_BYTES = 256 * 1024 * 1024


def decode_text(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def paginate(text: str, max_pages: int) -> list[RawPage]:
    """Split on form feeds, else into virtual pages; refuse before splitting when over max_pages."""
    if "\f" in text:
        if text.count("\f") + 1 > max_pages:
            raise PipelineError("too_many_pages", f"more than {max_pages} form-feed pages")
        return [RawPage(part) for part in text.split("\f")]
    estimate = len(text) // VIRTUAL_PAGE_CHARS
    if estimate > max_pages:
        raise PipelineError("too_many_pages", f"about {estimate} pages of text; the limit is {max_pages}")
    pages = []
    start = 0
    while start < len(text):
        end = min(len(text), start + VIRTUAL_PAGE_CHARS)
        if end < len(text):
            window = text[start:end]
            cut = max(window.rfind("\n\n"), window.rfind("\n"), window.rfind(" "))
            if cut > VIRTUAL_PAGE_CHARS // 2:
                end = start + cut + 1
        pages.append(RawPage(text[start:end]))
        start = end
    if len(pages) > max_pages:
        raise PipelineError("too_many_pages", f"{len(pages)} pages of text; the limit is {max_pages}")
    return pages or [RawPage("")]


def text_pages(path: Path, max_pages: int) -> list[RawPage]:
    return paginate(decode_text(path.read_bytes()), max_pages)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: scripts, styles and other non-content elements dropped."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    BLOCK = {"p", "div", "section", "article", "header", "footer", "li", "ul", "ol", "table", "tr",
             "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "title", "dt", "dd", "hr", "main",
             "nav", "aside", "figure", "figcaption", "form"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.parts.append("\n\n")
        elif tag in self.SKIP:
            self._skip_depth += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCK:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and tag != "title" and self._skip_depth:
            self._skip_depth -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth or self.lasttag == "title":
            # Inside an element, HTML collapses whitespace; line structure comes from the tags.
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        return "".join(self.parts)


def html_pages(path: Path, max_pages: int) -> list[RawPage]:
    parser = _HTMLText()
    parser.feed(decode_text(path.read_bytes()))
    parser.close()
    return paginate(parser.text(), max_pages)


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def docx_pages(path: Path, max_pages: int) -> list[RawPage]:
    """Paragraph text of word/document.xml; Word's own page breaks become pages where present."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("word/document.xml")
            if info.file_size > MAX_DOCX_XML_BYTES:
                raise PipelineError("too_large", f"document.xml inflates to {info.file_size} bytes")
            with archive.open(info) as xml:
                pages, breaks = _docx_paragraphs(xml)
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError) as exc:
        raise PipelineError("parse_error", f"not a readable DOCX: {exc}") from exc
    text = "\f".join("\n\n".join(page) for page in pages)
    if not breaks:
        text = text.replace("\f", "")
    return paginate(text, max_pages)


def _docx_paragraphs(xml) -> tuple[list[list[str]], int]:
    pages: list[list[str]] = [[]]
    breaks = 0
    for _event, element in ElementTree.iterparse(xml):
        if element.tag != f"{_W}p":
            continue
        parts = []
        for node in element.iter():
            if node.tag == f"{_W}t" and node.text:
                parts.append(node.text)
            elif node.tag == f"{_W}tab":
                parts.append("\t")
            elif node.tag == f"{_W}lastRenderedPageBreak" or (
                node.tag == f"{_W}br" and node.get(f"{_W}type") == "page"
            ):
                parts.append("\f")
                breaks += 1
        for index, piece in enumerate("".join(parts).split("\f")):
            if index:
                pages.append([])
            if piece.strip():
                pages[-1].append(piece)
        element.clear()
    return pages, breaks
