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

MID_WORD, WORD, LINE, SENTENCE, PARAGRAPH, HEADING = range(-1, 5)

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
    # Re-tokenizing a chunk on its own can differ from its slice of the whole-text tokenization at
    # the edges (a BPE word without its leading space): cut a little under the budget.
    return min(8, max(1, chunk_tokens // 32))


def _break_scores(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Score of breaking before each token (and one past the end).

    A token starts a word when a space precedes it or it begins with one (byte-level BPE tokens
    may carry their leading space). A break position p belongs to the first token ending after p.
    """
    scores = [WORD if i == 0 or text[s - 1].isspace() or text[s:s + 1].isspace() else MID_WORD
              for i, (s, _) in enumerate(offsets)]
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


def _best_break(scores: list[int], start: int, limit: int, budget: int) -> int:
    """Token index to end the chunk that begins at `start` (exclusive end, <= limit)."""
    best, best_score = limit, scores[limit]
    floor = start + max(1, budget // 2)
    heading_floor = start + max(1, budget // 4)
    for i in range(limit, heading_floor - 1, -1):
        score = scores[i]
        if i < floor and score < HEADING:
            continue
        if score > best_score:
            best, best_score = i, score
            if score == HEADING:
                break
    if best_score == MID_WORD:  # no word boundary in the back half: take any in the window
        for i in range(limit, start, -1):
            if scores[i] >= WORD:
                return i
    return best


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
    while start < n:
        end = n if n - start <= budget else _best_break(scores, start, start + budget, budget)
        char_start, char_end = _strip(full_text, offsets[start][0], offsets[end - 1][1])
        if char_end > char_start:  # a run of whitespace tokens alone makes no chunk
            chunks.append(Chunk(
                index=len(chunks), text=full_text[char_start:char_end], token_count=end - start,
                page_start=_page_of(page_starts, page_numbers, char_start),
                page_end=_page_of(page_starts, page_numbers, char_end - 1),
                char_start=char_start, char_end=char_end,
            ))
        if end >= n:
            break
        start = _overlap_start(scores, end, overlap_tokens, start) if overlap_tokens else end
    return DocumentText(full_text=full_text, page_spans=spans, chunks=chunks, token_count=n)
