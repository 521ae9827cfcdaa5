"""Pages -> the document's full text, page offset table and token-aware chunks.

The full text is tokenized once, with character offsets; chunks are cut on those offsets, so a
chunk's token count is known without tokenizing it again. Break points are ranked: before a heading,
at a paragraph break, after a sentence, at a line break, between words; the best-ranked one in the
back half of the token budget wins (the latest among equals), mid-word only when a "word" is longer
than the whole budget. Overlap re-starts the next chunk `overlap_tokens` back, at a word start.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from operator import itemgetter

from pipeline.tokens import TokenCounter
from pipeline.types import Chunk, DocumentText, PageSpan, PageText

PAGE_SEPARATOR = "\n\n"

MID_CHAR, MID_WORD, WORD, LINE, SENTENCE, PARAGRAPH, HEADING = range(-2, 5)

_HEADING = re.compile(
    r"^(?:#{1,6} \S.*|(?:ARTICLE|Article|SECTION|Section|CHAPTER|Chapter|PART|Part|ITEM|Item|SCHEDULE|"
    r"Schedule|EXHIBIT|Exhibit|APPENDIX|Appendix)\b.{0,80}|\d+(?:\.\d+)*\.?\s+[A-Z][^\n.]{0,80}|"
    r"[A-Z][A-Z0-9 ,&'()\-]{3,80})$",
    re.M,
)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"[.!?;:][\"'\u201d\u2019)\]]*\s+(?=\S)")
_LINE = re.compile(r"\n\s*")
_END = itemgetter(1)


def _safety_margin(chunk_tokens: int) -> int:
    # Edge words are re-counted exactly (_standalone_count); this small margin is for the rare
    # tokenizer whose pre-tokenization is not local, so a budget-sized chunk seldom needs a re-fit.
    return min(4, chunk_tokens // 64)


class _Breaks:
    """Where a chunk may end, and how good a place it is.

    Structural break points (heading, paragraph, sentence, line) come from a few regex passes over
    the text and are sparse; whether a token starts a word is looked up only near chunk edges and
    where a window has no structural point, so there is no per-token pass over the document.
    """

    def __init__(self, text: str, offsets: list[tuple[int, int]]) -> None:
        self.text, self.offsets, self.n = text, offsets, len(offsets)
        structural: dict[int, int] = {self.n: HEADING}  # the end of the text is the best break
        for pattern, score in ((_LINE, LINE), (_SENTENCE, SENTENCE), (_PARAGRAPH, PARAGRAPH)):
            for match in pattern.finditer(text):
                i = self.token_after(match.end())
                if i < self.n and structural.get(i, MID_CHAR) < score:
                    structural[i] = score
        previous_heading_end = -2
        for match in _HEADING.finditer(text):
            # "ARTICLE I\nDEFINITIONS" is one heading: break before its first line only.
            follows_heading = text[previous_heading_end:match.start()].isspace()
            previous_heading_end = match.end()
            i = self.token_after(match.start())
            if i < self.n and not follows_heading:
                structural[i] = HEADING
        self.structural = structural
        self.positions = sorted(structural)

    def token_after(self, char: int) -> int:
        """The first token ending after `char`: the one a break at `char` goes before."""
        return bisect_right(self.offsets, char, key=_END)

    def score(self, i: int) -> int:
        known = self.structural.get(i)
        if known is not None:
            return known
        start = self.offsets[i][0]
        if i and start < self.offsets[i - 1][1]:
            return MID_CHAR  # byte-level tokens of one multi-byte character share its offsets
        # A token starts a word when a space precedes it or it begins with one (BPE's " word").
        if i == 0 or self.text[start - 1].isspace() or self.text[start:start + 1].isspace():
            return WORD
        return MID_WORD

    def best(self, start: int, limit: int, budget: int, previous_end: int) -> int:
        """Token index to end the chunk that begins at `start`, in (previous_end, limit] so every
        chunk reaches past the one before it even when overlap pulled its start back. The highest
        score in the back half of the budget wins (a heading anywhere in the last three quarters),
        the latest among equals; mid-word only when no word starts in the whole window."""
        lowest = max(start, previous_end) + 1
        floor = max(lowest, start + budget // 2)
        heading_floor = max(lowest, start + budget // 4)
        best, best_score = limit, self.score(limit)
        first = bisect_right(self.positions, heading_floor - 1)
        for k in range(bisect_right(self.positions, limit) - 1, first - 1, -1):
            i = self.positions[k]
            score = self.structural[i]
            if i < floor and score < HEADING:
                continue
            if score > best_score:
                best, best_score = i, score
                if score == HEADING:
                    break
        if best_score >= WORD:
            return best
        for wanted in (WORD, MID_WORD):
            for i in range(limit, lowest - 1, -1):
                if self.score(i) >= wanted:
                    return i
        return limit

    def standalone_count(self, tokenizer: TokenCounter, start: int, end: int, text_start: int) -> int:
        """Tokens of the chunk [start, end), whose text begins at char `text_start`, tokenized on its
        own. Only its edge words can differ from the slice of the whole-text tokenization (a BPE
        word without its leading space, a word cut at the end), so only they are re-tokenized."""
        text, offsets = self.text, self.offsets
        first_word_end = start + 1  # the first word: every token up to the next word starting later
        while first_word_end < end and (self.score(first_word_end) < WORD
                                        or offsets[first_word_end][0] <= text_start):
            first_word_end += 1
        head = tokenizer.count(text[text_start:offsets[first_word_end - 1][1]])
        if first_word_end >= end:
            return head
        last_word_start, tail = end, 0
        if end < self.n and self.score(end) < WORD:  # the chunk ends inside a word
            last_word_start = end - 1
            while last_word_start > first_word_end and self.score(last_word_start) < WORD:
                last_word_start -= 1
            tail = tokenizer.count(text[offsets[last_word_start][0]:offsets[end - 1][1]])
        return head + (last_word_start - first_word_end) + tail

    def overlap_start(self, end: int, overlap: int, start: int) -> int:
        i = max(start + 1, end - overlap)
        while i < end and self.score(i) < WORD:
            i += 1
        return i


def _fit(tokenizer: TokenCounter, breaks: _Breaks, start: int, text_start: int, previous_end: int,
         budget: int, chunk_tokens: int) -> tuple[int, int]:
    """End token index and standalone token count of the chunk starting at token `start`, char
    `text_start`."""
    lowest = max(start, previous_end) + 1
    limit = min(breaks.n, start + budget)
    end = limit if limit == breaks.n else breaks.best(start, limit, budget, previous_end)
    count = breaks.standalone_count(tokenizer, start, end, text_start)
    while count > chunk_tokens and end > lowest:
        limit = max(lowest, min(end - 1, end - (count - chunk_tokens)))
        end = breaks.best(start, limit, budget, previous_end)
        count = breaks.standalone_count(tokenizer, start, end, text_start)
    return end, count


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    """Narrow [start, end) to its first and last non-space character (whitespace tokens exist in BPE)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _page_of(page_starts: list[int], page_numbers: list[int], char: int) -> int:
    return page_numbers[bisect_right(page_starts, char) - 1]


def build_document_text(pages: list[PageText], *, tokenizer: TokenCounter, chunk_tokens: int,
                        overlap_tokens: int) -> DocumentText:
    """Join pages into one text with a page offset table and cut it into token-budgeted chunks.

    Every chunk has at most `chunk_tokens` tokens (counted by `tokenizer`), chunks follow each
    other in order and together cover every non-space character, and chunk.text ==
    full_text[char_start:char_end]. page_start/page_end are the pages holding its first/last char.
    """
    if chunk_tokens < 8:
        raise ValueError("chunk_tokens must be at least 8")
    if not 0 <= overlap_tokens < chunk_tokens // 2:
        raise ValueError("overlap_tokens must be >= 0 and under half of chunk_tokens")
    spans, parts, offset = [], [], 0
    for page in pages:
        if parts:
            parts.append(PAGE_SEPARATOR)
            offset += len(PAGE_SEPARATOR)
        spans.append(PageSpan(page.number, offset, offset + len(page.text)))
        parts.append(page.text)
        offset += len(page.text)
    full_text = "".join(parts)

    offsets = tokenizer.offsets(full_text)
    breaks = _Breaks(full_text, offsets)
    budget = chunk_tokens - _safety_margin(chunk_tokens)
    text_spans = [s for s in spans if s.char_end > s.char_start]
    page_starts = [s.char_start for s in text_spans]
    page_numbers = [s.number for s in text_spans]

    chunks: list[Chunk] = []
    start, n = 0, len(offsets)
    covered_to = 0  # chunks so far cover full_text[:covered_to]
    previous_end = 0  # token index where the previous chunk ended
    text_end = len(full_text.rstrip())
    while start < n:
        # Characters no token covers (symbols some tokenizers drop) go with the chunk after them,
        # the tail with the last chunk: chunks cover every non-space character.
        char_start, _ = _strip(full_text, min(offsets[start][0], covered_to), len(full_text))
        end, count = _fit(tokenizer, breaks, start, char_start, previous_end, budget, chunk_tokens)
        char_end = text_end if end == n else offsets[end - 1][1]
        char_start, char_end = _strip(full_text, char_start, char_end)
        covered_to = max(covered_to, char_end)
        # Whitespace tokens alone, or an overlap-only tail, add nothing the chunks lack.
        if char_end > char_start and (not chunks or char_end > chunks[-1].char_end):
            chunks.append(Chunk(
                index=len(chunks), text=full_text[char_start:char_end], token_count=count,
                page_start=_page_of(page_starts, page_numbers, char_start),
                page_end=_page_of(page_starts, page_numbers, char_end - 1),
                char_start=char_start, char_end=char_end,
            ))
        if end >= n:
            break
        previous_end = end
        start = breaks.overlap_start(end, overlap_tokens, start) if overlap_tokens else end
        # The overlap must not pull the next chunk back to where this one began.
        while chunks and start < end and offsets[start][0] <= chunks[-1].char_start:
            start += 1
    return DocumentText(full_text=full_text, page_spans=spans, chunks=chunks, token_count=n)
