"""Documents -> citable sentence-sized segments that keep their character offsets and pages.

Pure Python (no torch): the extractive engine embeds these segments and every task cites them, so a
citation always names text that really lies on the pages it gives. Words are whitespace-separated
runs, except that each Chinese/Japanese character counts as one (those scripts use no spaces), so
word budgets (max_words, segment cuts) mean the same thing in every script.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from pipeline.types import DocumentText

MAX_SEGMENT_WORDS = 60  # longer sentences are cut so their tail is not lost to embedding truncation
MIN_SEGMENT_WORDS = 4  # shorter pieces are page numbers, headings, list markers

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORDLIKE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def count_words(text: str) -> int:
    return sum(1 for _ in _WORDLIKE.finditer(text))


def first_words(text: str, n: int) -> str:
    """The prefix of `text` holding its first n words (a prefix, so it still lies on the same page)."""
    for i, match in enumerate(_WORDLIKE.finditer(text), start=1):
        if i == n:
            return text[:match.end()]
    return text


def _mostly_letters(piece: str) -> bool:
    return sum(c.isalpha() for c in piece) >= len(piece) / 2


# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace and an opening
# character, or at a blank line. Abbreviations and initials are vetoed in _sentence_ends.
_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])|\n[ \t]*\n\s*|[。！？][」』”’)]*\s*")
_ABBREVIATIONS = {
    "inc", "ltd", "co", "corp", "llc", "no", "nos", "sec", "secs", "mr", "mrs", "ms", "dr", "st", "ste",
    "jr", "sr", "vs", "v", "etc", "e.g", "i.e", "art", "fig", "figs", "al", "approx", "dept", "u.s",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "p", "pp",
}
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")


@dataclass(frozen=True)
class Sentence:
    """One citable segment: full_text[char_start:char_end], lying on pages page_start..page_end."""

    text: str  # whitespace-normalized
    char_start: int
    char_end: int
    page_start: int
    page_end: int

    @property
    def words(self) -> int:
        return count_words(self.text)

    def citation(self) -> dict[str, object]:
        return {"text": self.text, "page_start": self.page_start, "page_end": self.page_end,
                "char_start": self.char_start, "char_end": self.char_end}


def _sentence_ends(text: str) -> list[int]:
    ends = []
    for match in _END.finditer(text):
        head = text[max(0, match.start() - 12):match.start() + 1]
        word = _WORD_BEFORE.search(head)
        if word and match.group(0)[0] == "." and (
                word.group(1).lower() in _ABBREVIATIONS or len(word.group(1)) == 1):
            continue  # "Inc. (the", "U.S. Virgin", "J. Smith": not a sentence end
        ends.append(match.end())
    ends.append(len(text))
    return ends


def _cut_long(start: int, end: int, text: str) -> list[tuple[int, int]]:
    """Split text[start:end] into pieces of at most MAX_SEGMENT_WORDS words, preferring ; and , cuts."""
    words = [m.span() for m in _WORDLIKE.finditer(text, start, end)]  # absolute offsets
    pieces = []
    while len(words) > MAX_SEGMENT_WORDS:
        window = words[:MAX_SEGMENT_WORDS]
        cut = next((i + 1 for i in range(len(window) - 1, MAX_SEGMENT_WORDS // 2, -1)
                    if text[window[i][1] - 1] in ";,:"), MAX_SEGMENT_WORDS)
        pieces.append((words[0][0], words[cut - 1][1]))
        words = words[cut:]
    if words:
        pieces.append((words[0][0], words[-1][1]))
    return pieces


def split_sentences(doc: DocumentText) -> list[Sentence]:
    """Citable segments of the document in reading order, each with its page span."""
    text = doc.full_text
    starts = [s.char_start for s in doc.page_spans]
    spans = doc.page_spans

    def page_of(pos: int) -> int:
        i = max(0, bisect.bisect_right(starts, pos) - 1)
        return spans[i].number if spans else 1

    sentences: list[Sentence] = []
    begin = 0
    for end in _sentence_ends(text):
        for a, b in _cut_long(begin, end, text):
            piece = " ".join(text[a:b].split())
            if count_words(piece) < MIN_SEGMENT_WORDS or not _mostly_letters(piece):
                continue
            sentences.append(Sentence(piece, a, b, page_of(a), page_of(b - 1)))
        begin = end
    return sentences or _chunk_segments(doc)


def _chunk_segments(doc: DocumentText) -> list[Sentence]:
    """Fallback when no sentence-like segment exists (tables, word lists): the chunks themselves."""
    return [Sentence(" ".join(c.text.split()), c.char_start, c.char_end, c.page_start, c.page_end)
            for c in doc.chunks if c.text.strip() and _mostly_letters(" ".join(c.text.split()))]
