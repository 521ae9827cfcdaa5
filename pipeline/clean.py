"""Text clean-up that helps the model and costs no facts.

Steps, in the order clean_pages runs them:
1. normalize_unicode: NFC, CRLF -> LF, control characters dropped, exotic spaces -> space.
2. remove_repeated_margins: header/footer lines and page numbers that repeat across pages.
3. dehyphenate: words split across line breaks ("infrastruc-\\nture", or PDFium's U+FFFE marker)
   are joined, unless the document itself shows the hyphen is real ("Multi-State", "well-known").
4. normalize_whitespace: runs of spaces collapsed, lines trimmed, at most one blank line in a row.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

# PDFium reports a hyphen it saw at a line end as U+FFFE and joins the two lines itself.
PDFIUM_HYPHEN = "\ufffe"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# A hyphen at a line end: PDFium's marker (it already joined the lines), a soft hyphen or "-" + LF.
_BREAK_HYPHEN = re.compile(r"\ufffe|[\u00ad-][ \t]*\n[ \t]*")
_WORD_EDGE_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026\u2022\u00b7\u2013\u2014"
_MULTI_SPACE = re.compile(r" {2,}")
_MULTI_BLANK = re.compile(r"\n{3,}")
_DIGITS = re.compile(r"\d+")
_LETTERS = re.compile(r"[^\W\d_]")
_PAGE_NUMBER = re.compile(r"^(?:page\s+)?[-\u2013\u2014\s]*(\d{1,5}|[ivxlcdm]{1,7})[-\u2013\u2014\s]*(?:of\s+\d+)?$",
                          re.I)
_ROMAN_VALUES = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100, "d": 500, "m": 1000}

MARGIN_LINES = 3  # how many lines at the top and at the bottom of a page can be header/footer
MIN_LINES_FOR_MARGINS = 4


def normalize_unicode(text: str) -> str:
    """NFC, LF line ends, no control characters, every kind of space as U+0020."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    return unicodedata.normalize("NFC", text)


def normalize_whitespace(text: str) -> str:
    text = "\n".join(map(str.strip, _MULTI_SPACE.sub(" ", text).split("\n")))
    return _MULTI_BLANK.sub("\n\n", text).strip()


def _margin_key(line: str) -> str:
    return _DIGITS.sub("#", " ".join(line.lower().split()))


def _page_number(line: str) -> int | None:
    """The number on a bare page-number line ("7", "- 7 -", "Page 7 of 40", "vii"), else None."""
    match = _PAGE_NUMBER.match(line.strip())
    if not match:
        return None
    token = match.group(1).lower()
    if token.isdigit():
        return int(token)
    values = [_ROMAN_VALUES[ch] for ch in token]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _margin_indices(lines: list[str]) -> list[int]:
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if len(filled) < MIN_LINES_FOR_MARGINS:
        return []  # a page this short is all body: "This is page 3" is content, not a footer
    if len(filled) <= 2 * MARGIN_LINES:
        return filled
    return filled[:MARGIN_LINES] + filled[-MARGIN_LINES:]


def remove_repeated_margins(pages: list[str]) -> tuple[list[str], int]:
    """Drop header/footer lines and page numbers that recur in the margins of many pages.

    Margins are the first and last MARGIN_LINES non-blank lines of a page. A text line is keyed
    with digits masked ("Source: X, 10-Q, 5/9/2019" on every page, "Page 3 of 40") and removed when
    its key, holding at least 3 letters, recurs on >= 40% of the text pages (at least 3). A bare
    number is removed only when it follows the page sequence (number - page index is the same on
    >= 30% of the pages, at least 2), so list items such as "2." and section numbers stay.
    The first copy of each repeated text line is kept, so the document still says it once.
    Lines in the body of a page are never touched. Returns the new pages and the lines removed.
    """
    text_pages = sum(1 for page in pages if page.strip())
    if text_pages < 3:
        return pages, 0
    split = [page.split("\n") for page in pages]
    # (line index, masked key, page number or None) of every margin line; headers repeat, so each
    # distinct line is analysed once
    seen_lines: dict[str, tuple[str, int | None]] = {}

    def analyse(line: str) -> tuple[str, int | None]:
        if line not in seen_lines:
            seen_lines[line] = (_margin_key(line), _page_number(line))
        return seen_lines[line]

    margins = [[(i, *analyse(lines[i])) for i in _margin_indices(lines)] for lines in split]
    keys: Counter[str] = Counter()
    offsets: Counter[int] = Counter()
    for index, margin in enumerate(margins):
        keys.update({key for _, key, _ in margin if len(_LETTERS.findall(key)) >= 3})
        offsets.update({number - index for _, _, number in margin if number is not None})
    generic_min = max(3, int(0.4 * text_pages + 0.999))
    number_min = max(2, int(0.3 * text_pages + 0.999))
    repeated = {key for key, n in keys.items() if n >= generic_min}
    page_offsets = {offset for offset, n in offsets.items() if n >= number_min}

    removed = 0
    out = []
    kept_once: set[str] = set()
    for index, (lines, margin) in enumerate(zip(split, margins, strict=True)):
        drop = set()
        for i, key, number in margin:
            if number is not None:
                if number - index in page_offsets:
                    drop.add(i)
            elif key in repeated:
                if key in kept_once:
                    drop.add(i)
                else:
                    kept_once.add(key)  # the first copy stays: "Source: X, 10-Q" is said once
        removed += len(drop)
        out.append("\n".join(line for i, line in enumerate(lines) if i not in drop) if drop
                   else pages[index])
    return out, removed


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def dehyphenate(text: str, vocabulary: set[str]) -> str:
    """Join words broken across a line end; keep the hyphen where the document says it is real.

    vocabulary: the document's lower-cased words (document_vocabulary). The hyphen stays when the
    second part starts with a capital or digit ("Multi-State", "1990-1995"), when the document
    spells the hyphenated word out elsewhere, or when both parts are words of the document and the
    joined form is not ("implementation-focused"); otherwise the parts are joined ("infrastructure").
    """
    pieces: list[str] = []
    done = 0
    for match in _BREAK_HYPHEN.finditer(text):
        left_start = match.start()
        while left_start > 0 and _is_word_char(text[left_start - 1]):
            left_start -= 1
        right_end = match.end()
        while right_end < len(text) and _is_word_char(text[right_end]):
            right_end += 1
        left, right = text[left_start:match.start()], text[match.end():right_end]
        if not left or not right:
            continue  # a dash in a list or a form ("Name: -"), not a broken word
        pieces.append(text[done:match.start()])
        pieces.append("-" if _keep_hyphen(left, right, vocabulary) else "")
        done = match.end()
    pieces.append(text[done:])
    return "".join(pieces).replace(PDFIUM_HYPHEN, "-")


def _keep_hyphen(left: str, right: str, vocabulary: set[str]) -> bool:
    if (left + right).lower() in vocabulary:
        return False
    return (
        right[0].isupper()
        or right[0].isdigit()
        or f"{left}-{right}".lower() in vocabulary
        or (len(left) >= 3 and len(right) >= 3 and left.lower() in vocabulary and right.lower() in vocabulary)
    )


def document_vocabulary(pages: list[str]) -> set[str]:
    """Lower-cased words of a document (hyphenated ones whole), with the line-break hyphen sites
    kept as single tokens so their fragments ("infrastruc", "ture") do not count as words."""
    body = _BREAK_HYPHEN.sub(PDFIUM_HYPHEN, "\n".join(pages).lower())
    return {token.strip(_WORD_EDGE_PUNCTUATION) for token in set(body.split())}  # strip unique tokens only


def clean_pages(pages: list[str], *, remove_margins: bool = True) -> tuple[list[str], list[str]]:
    """Run every cleaning step over a document's pages. Returns cleaned pages and warnings."""
    pages = [normalize_unicode(page) for page in pages]
    removed = 0
    if remove_margins:
        pages, removed = remove_repeated_margins(pages)
    if any(_BREAK_HYPHEN.search(page) for page in pages):
        vocabulary = document_vocabulary(pages)
        pages = [dehyphenate(page, vocabulary) for page in pages]
    pages = [normalize_whitespace(page) for page in pages]
    warnings = [f"removed {removed} repeated header/footer/page-number lines"] if removed else []
    return pages, warnings
