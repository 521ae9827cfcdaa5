"""Parameter and result models of the three tasks: one schema per task, the same for every engine.

Pure pydantic (no torch): the API validates job params with these models and documents the results
with them in its OpenAPI schema; pipeline.tasks.run_task validates every result against them, so an
extractive and an MPT result of the same task have exactly the same shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

DEFAULT_MAX_WORDS = 200
MAX_QUESTIONS = 20
MAX_QUESTION_CHARS = 1000
MIN_LABELS = 2
MAX_LABELS = 50
MAX_LABEL_CHARS = 200
# What a document is when the caller names no labels (the issue's document types).
DEFAULT_LABELS = ("contract", "report", "paper", "form", "other")
NOT_STATED = "not stated in the document"  # a valid QA answer, said plainly

# JSON Schema pattern for "no NUL (Postgres cannot store it), and a character str.split() keeps": the
# whitespace is spelled out because Python's (str.isspace: \x1c-\x1f too) is not the \s of ECMA or
# Rust regexes.
PY_WHITESPACE = "\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK = f"^[^\\x00]*[^{PY_WHITESPACE}\\x00][^\\x00]*$"


def _text(max_chars: int) -> object:
    """A str as the OpenAPI schema shows it: what _clean_list accepts (the validators keep their messages)."""
    return WithJsonSchema({"type": "string", "pattern": NON_BLANK, "maxLength": max_chars})


def _collapse(text: str) -> str:
    return " ".join(text.split())  # "a  b" == "a b": whitespace never makes two values differ


def _clean_list(name: str, values: list[str], max_chars: int) -> list[str]:
    cleaned = [_collapse(v) for v in values]
    for i, value in enumerate(cleaned):
        if not value:
            raise ValueError(f"{name}[{i}] is empty")
        if "\x00" in value:
            raise ValueError(f"{name}[{i}] contains a NUL character")
        if len(values[i]) > max_chars:  # as sent, like the schema's maxLength
            raise ValueError(f"{name}[{i}] is {len(values[i])} characters; the limit is {max_chars}")
    return cleaned


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SummarizeParams(_Params):
    """A summary of at most max_words words (or, for a generating engine, max_tokens tokens)."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["max_words", "max_tokens"]}})

    max_words: StrictInt | None = Field(None, ge=10, le=5000, description=f"Word budget (default {DEFAULT_MAX_WORDS}).")
    max_tokens: StrictInt | None = Field(None, ge=16, le=4096, description="Token budget instead of max_words.")
    style: Literal["paragraph", "bullets"] = "paragraph"
    focus: Annotated[str, _text(MAX_QUESTION_CHARS)] | None = Field(
        None, min_length=1, max_length=MAX_QUESTION_CHARS, description="A topic the summary should concentrate on.")

    @field_validator("focus")
    @classmethod
    def _focus(cls, value: str | None) -> str | None:
        if value is not None and not _collapse(value):
            raise ValueError("focus is empty")
        if value is not None and "\x00" in value:
            raise ValueError("focus contains a NUL character")
        return None if value is None else _collapse(value)

    @model_validator(mode="after")
    def _one_budget(self) -> SummarizeParams:
        if self.max_words is not None and self.max_tokens is not None:
            raise ValueError("give either max_words or max_tokens, not both")
        if self.max_words is None and self.max_tokens is None:
            self.max_words = DEFAULT_MAX_WORDS
        return self

    def word_budget(self) -> int:
        """max_words, or max_tokens in words (English runs ~0.75 words per token)."""
        return self.max_words if self.max_words is not None else max(10, int(self.max_tokens * 0.75))

    def token_budget(self) -> int:
        """max_tokens, or max_words in tokens (~4/3 tokens per word)."""
        return self.max_tokens if self.max_tokens is not None else int(self.max_words * 4 / 3) + 8


def _qa_schema(schema: dict) -> None:
    # The single-question spelling that _single_question accepts, so the schema allows it too.
    schema["properties"]["question"] = {"type": "string", "pattern": NON_BLANK, "maxLength": MAX_QUESTION_CHARS,
                                        "description": "One question (instead of questions)."}
    schema.pop("required", None)
    schema["oneOf"] = [{"required": ["questions"]}, {"required": ["question"]}]


class QaParams(_Params):
    model_config = ConfigDict(json_schema_extra=_qa_schema)

    questions: list[Annotated[str, _text(MAX_QUESTION_CHARS)]] = Field(
        min_length=1, max_length=MAX_QUESTIONS, description="One or more questions.")

    @model_validator(mode="before")
    @classmethod
    def _single_question(cls, data: object) -> object:
        if isinstance(data, dict) and "question" in data:
            if "questions" in data:
                raise ValueError("give either 'question' or 'questions', not both")
            rest = {k: v for k, v in data.items() if k != "question"}
            return {**rest, "questions": [data["question"]]}
        return data

    @field_validator("questions")
    @classmethod
    def _questions(cls, values: list[str]) -> list[str]:
        return _clean_list("questions", values, MAX_QUESTION_CHARS)


class ClassifyParams(_Params):
    labels: list[Annotated[str, _text(MAX_LABEL_CHARS)]] = Field(
        default_factory=lambda: list(DEFAULT_LABELS), min_length=MIN_LABELS, max_length=MAX_LABELS,
        json_schema_extra={"uniqueItems": True},
        description="Candidate labels (default: document types); no two the same ignoring case and spacing.")
    multi_label: StrictBool = False

    @field_validator("labels")
    @classmethod
    def _labels(cls, values: list[str]) -> list[str]:
        labels = _clean_list("labels", values, MAX_LABEL_CHARS)
        seen: dict[str, str] = {}
        for label in labels:
            if label.casefold() in seen:
                raise ValueError(f"duplicate label {label!r} (same as {seen[label.casefold()]!r})")
            seen[label.casefold()] = label
        return labels


# --- results ----------------------------------------------------------------------------------------

NonNegative = Annotated[int, Field(ge=0)]
Page = Annotated[int, Field(ge=1)]


class Span(BaseModel):
    """Where cited text lies: pages page_start..page_end, full_text[char_start:char_end]."""

    model_config = ConfigDict(extra="forbid")
    page_start: Page
    page_end: Page
    char_start: NonNegative
    char_end: NonNegative


class Citation(Span):
    sentence: NonNegative | None = Field(None, description="Index of the summary sentence this passage supports.")


class Evidence(Span):
    text: str = Field(description="The cited document text (whitespace-normalized).")
    score: float | None = Field(None, description="Retrieval score of this passage (engine-specific scale).")


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="Which strategy ran, e.g. extractive, whole_document, map_reduce, retrieval.")
    engine: Literal["extractive", "mpt"]
    model: str = Field(description="The model that produced the result (checkpoint or embedding model).")


class SummarizeResult(_Result):
    summary: str
    tokens_in: NonNegative = Field(description="Document tokens the engine read.")
    tokens_out: NonNegative = Field(description="Tokens of the summary.")
    citations: list[Citation] = Field(description="The document passages the summary's sentences come from.")


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    answer: str = Field(description=f"The answer, or {NOT_STATED!r}.")
    evidence: list[Evidence] = Field(description="Where the answer comes from, best first.")
    confidence: float = Field(ge=0.0, le=1.0)


class QaResult(_Result):
    answers: list[Answer]


class ClassifyResult(_Result):
    label: str = Field(description="The most probable label.")
    labels: list[str] = Field(description="Every label that applies (just `label` unless multi_label).")
    scores: dict[str, float] = Field(description="Probability per label.")
