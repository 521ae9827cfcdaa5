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


def _safety_margin(chunk_tokens: int) -> int:
    # Edge words are re-counted exactly (_standalone_count); this small margin is for the rare
    # tokenizer whose pre-tokenization is not local, so a budget-sized chunk seldom needs a re-fit.
    return min(4, chunk_tokens // 64)


def _break_scores(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Score of breaking before each token (and one past the end).

    A token starts a word when a space precedes it or it begins with one (byte-level BPE tokens
    may carry their leading space). A break position p belongs to the first token ending after p.
    """
    scores = [WORD if i == 0 or text[s - 1].isspace() or text[s:s + 1].isspace() else MID_WORD
              for i, (s, _) in enumerate(offsets)]
    # Byte-level tokens of one multi-byte character share its offsets: never cut between them.
    for i in range(1, len(offsets)):
        if offsets[i][0] < offsets[i - 1][1]:
            scores[i] = MID_CHAR
    scores.append(HEADING)
    ends = [e for _, e in offsets]
    for pattern, score in ((_LINE, LINE), (_SENTENCE, SENTENCE), (_PARAGRAPH, PARAGRAPH)):
        for match in pattern.finditer(text):
            i = bisect_right(ends, match.end())
            if i < len(ends) and scores[i] < score:
                scores[i] = score
    previous_heading_end = -2
    for match in _HEADING.finditer(text):
        # "ARTICLE I\nDEFINITIONS" is one heading: break before its first line only.
        follows_heading = text[previous_heading_end:match.start()].isspace()
        previous_heading_end = match.end()
        i = bisect_right(ends, match.start())
        if i < len(ends) and not follows_heading:
            scores[i] = HEADING
    return scores


def _best_break(scores: list[int], start: int, limit: int, budget: int, previous_end: int) -> int:
    """Token index to end the chunk that begins at `start`: in (previous_end, limit], so every
    chunk reaches past the one before it even when overlap pulled its start back."""
    lowest = max(start, previous_end) + 1
    floor = max(lowest, start + budget // 2)
    heading_floor = max(lowest, start + budget // 4)
    best, best_score = limit, scores[limit]
    for i in range(limit, heading_floor - 1, -1):
        score = scores[i]
        if i < floor and score < HEADING:
            continue
        if score > best_score:
            best, best_score = i, score
            if score == HEADING:
                break
    if best_score <= MID_WORD:  # no word boundary in the back half: take any in the window
        for wanted in (WORD, MID_WORD):
            for i in range(limit, lowest - 1, -1):
                if scores[i] >= wanted:
                    return i
    return best


def _standalone_count(tokenizer: TokenCounter, text: str, offsets: list[tuple[int, int]], scores: list[int],
                      start: int, end: int) -> int:
    """Tokens of text[tokens start..end) tokenized on its own. Only the edge words can differ from
    the slice of the whole-text tokenization (a BPE word without its leading space, a word cut at
    the end), so only they are re-tokenized."""
    first_word_end = start + 1
    while first_word_end < end and scores[first_word_end] < WORD:
        first_word_end += 1
    head = tokenizer.count(text[offsets[start][0]:offsets[first_word_end - 1][1]])
    if first_word_end >= end:
        return head
    last_word_start, tail = end, 0
    if end < len(offsets) and scores[end] < WORD:  # the chunk ends inside a word
        last_word_start = end - 1
        while last_word_start > first_word_end and scores[last_word_start] < WORD:
            last_word_start -= 1
        tail = tokenizer.count(text[offsets[last_word_start][0]:offsets[end - 1][1]])
    return head + (last_word_start - first_word_end) + tail


def _fit(tokenizer: TokenCounter, text: str, offsets: list[tuple[int, int]], scores: list[int], start: int,
         previous_end: int, budget: int, chunk_tokens: int) -> tuple[int, int]:
    """End token index and standalone token count of the chunk starting at `start`."""
    n = len(offsets)
    lowest = max(start, previous_end) + 1
    limit = min(n, start + budget)
    end = limit if limit == n else _best_break(scores, start, limit, budget, previous_end)
    count = _standalone_count(tokenizer, text, offsets, scores, start, end)
    while count > chunk_tokens and end > lowest:
        limit = max(lowest, min(end - 1, end - (count - chunk_tokens)))
        end = _best_break(scores, start, limit, budget, previous_end)
        count = _standalone_count(tokenizer, text, offsets, scores, start, end)
    return end, count


def _overlap_start(scores: list[int], end: int, overlap: int, start: int) -> int:
    i = max(start + 1, end - overlap)
    while i < end and scores[i] < WORD:
        i += 1
    return i


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
    scores = _break_scores(full_text, offsets)
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
        end, count = _fit(tokenizer, full_text, offsets, scores, start, previous_end, budget, chunk_tokens)
        # Characters no token covers (symbols some tokenizers drop) go with the chunk after them,
        # the tail with the last chunk: chunks cover every non-space character.
        char_start = min(offsets[start][0], covered_to)
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
        start = _overlap_start(scores, end, overlap_tokens, start) if overlap_tokens else end
        # The overlap must not pull the next chunk back to where this one began.
        while chunks and start < end and offsets[start][0] <= chunks[-1].char_start:
            start += 1
    return DocumentText(full_text=full_text, page_spans=spans, chunks=chunks, token_count=n)
