"""Media type from the first bytes of a file, never from its name or the client's claim.

A renamed file is parsed as what it is (a PDF called .txt is a PDF) or refused (an ODT called .pdf).
"""

from __future__ import annotations

import re

PDF = "application/pdf"
TEXT = "text/plain"
MARKDOWN = "text/markdown"
HTML = "text/html"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"

SNIFF_BYTES = 8192
# PDF readers accept junk before the header (mail gateways prepend it); the spec's readers look at
# the first 1 KiB, so do we.
_PDF_HEADER_WINDOW = 1024
_HTML_START = re.compile(rb"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)[\s>]", re.I | re.S)
_HTML_TAGS = re.compile(rb"<(html|head|body|title|meta|div|p|table|script)[\s>/]", re.I)
_MARKDOWN_HINTS = re.compile(
    r"^(#{1,6} \S|```|~~~|\s{0,3}[-*+] \S|\s{0,3}\d+[.)] \S|>\s|\|.*\|\s*$|(=+|-+)\s*$)|\[[^\]\n]+\]\([^)\s]+\)",
    re.M,
)
# Control bytes that never occur in real text files (tab, LF, FF, CR and ESC aside).
_BINARY_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))


def sniff_media_type(head: bytes) -> str | None:
    """Return the media type the bytes really are, or None when longdoc cannot parse them.

    `head` is the start of the file (the first SNIFF_BYTES are looked at). Returns one of
    application/pdf, text/plain, text/markdown, text/html or the DOCX type; None for anything
    else, including an empty head (the caller reports empty files as `empty_file`).
    """
    head = head[:SNIFF_BYTES]
    if not head:
        return None
    if b"%PDF-" in head[:_PDF_HEADER_WINDOW]:
        return PDF
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(head)
    text = decode_text_head(head)
    if text is None:
        return None
    if _HTML_START.match(text.encode("utf-8", "ignore")) or len(_HTML_TAGS.findall(head)) >= 3:
        return HTML
    if _looks_like_markdown(text):
        return MARKDOWN
    return TEXT


def _sniff_zip(head: bytes) -> str | None:
    # OOXML names its parts in the local file headers; ODT/EPUB start with a `mimetype` entry.
    if head[30:38] == b"mimetype":
        return None
    if b"word/" in head and b"[Content_Types].xml" in head:
        return DOCX
    return None


def decode_text_head(head: bytes) -> str | None:
    """Decode bytes that look like text (UTF-8/UTF-16 with BOM, else a single-byte codepage); None if binary."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return head.decode("utf-16", "ignore")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    if any(b in _BINARY_CONTROL for b in head):
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the 8 KiB window is still UTF-8.
        if exc.start >= len(head) - 3 and exc.reason.startswith("unexpected end"):
            return head[: exc.start].decode("utf-8")
    return head.decode("cp1252", "replace")


def _looks_like_markdown(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return False
    hits = len(_MARKDOWN_HINTS.findall(text))
    starts_with_heading = bool(re.match(r"#{1,6} \S", lines[0]))
    return starts_with_heading or hits >= max(2, len(lines) // 20)
