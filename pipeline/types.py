"""Plain data passed between parsing, chunking, the model tasks and the workers.

pipeline/ imports neither storage/ nor workers/: these dataclasses are the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PipelineError(Exception):
    """A failure that belongs to one document or job, with a stable machine-readable code.

    Codes used: unsupported_media_type, empty_file, password_required, wrong_password, parse_error,
    parse_timeout, parse_memory, too_many_pages, too_large, no_text_layer, context_too_long,
    invalid_params, model_error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PageText:
    number: int  # 1-based physical page number
    text: str  # cleaned text
    label: str | None = None  # the PDF's page label ("iv", "A-3") where defined
    needs_ocr: bool = False  # the page has no text layer


@dataclass
class ParsedDocument:
    media_type: str
    pages: list[PageText]
    warnings: list[str] = field(default_factory=list)

    @property
    def needs_ocr_pages(self) -> int:
        return sum(p.needs_ocr for p in self.pages)


@dataclass(frozen=True)
class PageSpan:
    """Where one page's text sits in the document's full text: full_text[char_start:char_end]."""

    number: int
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str  # == full_text[char_start:char_end]
    token_count: int
    page_start: int
    page_end: int
    char_start: int
    char_end: int


@dataclass
class DocumentText:
    """The whole document as the model tasks see it: full text, page offset table, chunks."""

    full_text: str
    page_spans: list[PageSpan]
    chunks: list[Chunk]
    token_count: int

    def pages_for(self, char_start: int, char_end: int) -> tuple[int, int]:
        """First and last page number overlapping [char_start, char_end)."""
        hits = [s.number for s in self.page_spans if s.char_start < max(char_end, char_start + 1)
                and s.char_end > char_start]
        if not hits:
            raise ValueError(f"span {char_start}:{char_end} lies outside every page")
        return hits[0], hits[-1]
