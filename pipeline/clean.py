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
import unicodedata
from collections import Counter

# PDFium reports a hyphen it saw at a line end as U+FFFE and joins the two lines itself.
PDFIUM_HYPHEN = "\ufffe"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_HYPHEN_SITE = re.compile(
    r"(\w+)(?:\ufffe|[\u00ad-][ \t]*\n[ \t]*)(?=(\w+))"
)
_WORD = re.compile(r"\w+")
_HYPHENATED_WORD = re.compile(r"\w+(?:-\w+)+")
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
    text = _MULTI_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
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
    split = [page.split("\n") for page in pages]
    text_pages = sum(1 for page in pages if page.strip())
    if text_pages < 3:
        return pages, 0
    keys: Counter[str] = Counter()
    offsets: Counter[int] = Counter()
    for index, lines in enumerate(split):
        margin = [lines[i] for i in _margin_indices(lines)]
        keys.update({k for k in map(_margin_key, margin) if len(_LETTERS.findall(k)) >= 3})
        offsets.update({n - index for n in map(_page_number, margin) if n is not None})
    generic_min = max(3, int(0.4 * text_pages + 0.999))
    number_min = max(2, int(0.3 * text_pages + 0.999))
    repeated = {key for key, n in keys.items() if n >= generic_min}
    page_offsets = {offset for offset, n in offsets.items() if n >= number_min}

    def is_margin_noise(index: int, line: str) -> bool:
        number = _page_number(line)
        if number is not None:
            return number - index in page_offsets
        return _margin_key(line) in repeated

    removed = 0
    out = []
    kept_once: set[str] = set()
    for index, lines in enumerate(split):
        drop = set()
        for i in _margin_indices(lines):
            if is_margin_noise(index, lines[i]):
                key = _margin_key(lines[i])
                if _page_number(lines[i]) is None and key in repeated and key not in kept_once:
                    kept_once.add(key)  # the first copy stays: "Source: X, 10-Q" is said once
                else:
                    drop.add(i)
        removed += len(drop)
        out.append("\n".join(line for i, line in enumerate(lines) if i not in drop))
    return out, removed


def dehyphenate(text: str, vocabulary: Counter[str], hyphenated: set[str]) -> str:
    """Join words broken across a line end; keep the hyphen where the document says it is real.

    vocabulary: lower-cased word counts of the document outside the break sites; hyphenated: the
    lower-cased hyphenated words the document spells out in full.
    """

    def join(match: re.Match[str]) -> str:
        left, right = match.group(1), match.group(2)
        joined = (left + right).lower()
        if joined in vocabulary:
            return left
        keep = (
            right[0].isupper()
            or right[0].isdigit()
            or f"{left}-{right}".lower() in hyphenated
            or (len(left) >= 3 and len(right) >= 3 and left.lower() in vocabulary
                and right.lower() in vocabulary)
        )
        return left + "-" if keep else left

    text = _HYPHEN_SITE.sub(join, text)
    return text.replace(PDFIUM_HYPHEN, "-")


def document_vocabulary(pages: list[str]) -> tuple[Counter[str], set[str]]:
    """Word counts and hyphenated words of a document, ignoring the words around break sites."""
    body = "\n".join(_HYPHEN_SITE.sub(" ", page) for page in pages)
    words = Counter(w.lower() for w in _WORD.findall(body))
    hyphenated = {w.lower() for w in _HYPHENATED_WORD.findall(body)}
    return words, hyphenated


def clean_pages(pages: list[str], *, remove_margins: bool = True) -> tuple[list[str], list[str]]:
    """Run every cleaning step over a document's pages. Returns cleaned pages and warnings."""
    pages = [normalize_unicode(page) for page in pages]
    removed = 0
    if remove_margins:
        pages, removed = remove_repeated_margins(pages)
    vocabulary, hyphenated = document_vocabulary(pages)
    pages = [normalize_whitespace(dehyphenate(page, vocabulary, hyphenated)) for page in pages]
    warnings = [f"removed {removed} repeated header/footer/page-number lines"] if removed else []
    return pages, warnings
