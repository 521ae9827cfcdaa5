"""Validation and normalization of job params, one schema per task.

The API calls this before it stores a job (so a bad request answers 400 and nothing is queued) and
the worker calls it again before running (so a row written by an older version still fails cleanly).
Pure Python: no torch, no model.
"""

from __future__ import annotations

from typing import Any

from pipeline.types import PipelineError

TASKS = ("summarize", "qa", "classify")

DEFAULT_MAX_WORDS = 200
MIN_MAX_WORDS = 10
MAX_MAX_WORDS = 5000
MAX_QUESTIONS = 20
MAX_QUESTION_CHARS = 1000
MIN_LABELS = 2
MAX_LABELS = 50
MAX_LABEL_CHARS = 200


def _invalid(message: str) -> PipelineError:
    return PipelineError("invalid_params", message)


def _reject_unknown_keys(task: str, params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _invalid(f"unknown param(s) for {task}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _clean_strings(name: str, values: Any, *, max_chars: int) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _invalid(f"{name} must be a list of strings")
    cleaned = [" ".join(v.split()) for v in values]  # collapse whitespace so "a  b" == "a b"
    for i, v in enumerate(cleaned):
        if not v:
            raise _invalid(f"{name}[{i}] is empty")
        if len(v) > max_chars:
            raise _invalid(f"{name}[{i}] is {len(v)} characters; the limit is {max_chars}")
    return cleaned


def _summarize(params: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown_keys("summarize", params, {"max_words"})
    max_words = params.get("max_words", DEFAULT_MAX_WORDS)
    # bool is an int subclass: reject it explicitly so {"max_words": true} is not 1 word.
    if isinstance(max_words, bool) or not isinstance(max_words, int):
        raise _invalid(f"max_words must be an integer, got {type(max_words).__name__}")
    if not MIN_MAX_WORDS <= max_words <= MAX_MAX_WORDS:
        raise _invalid(f"max_words must be between {MIN_MAX_WORDS} and {MAX_MAX_WORDS}, got {max_words}")
    return {"max_words": max_words}


def _qa(params: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown_keys("qa", params, {"questions", "question"})
    if "question" in params and "questions" in params:
        raise _invalid("give either 'question' or 'questions', not both")
    if "question" in params:
        if not isinstance(params["question"], str):
            raise _invalid("question must be a string")
        raw: Any = [params["question"]]
    elif "questions" in params:
        raw = params["questions"]
    else:
        raise _invalid("qa needs 'questions' (a list of strings) or 'question' (a string)")
    questions = _clean_strings("questions", raw, max_chars=MAX_QUESTION_CHARS)
    if not questions:
        raise _invalid("questions is empty; give at least one question")
    if len(questions) > MAX_QUESTIONS:
        raise _invalid(f"{len(questions)} questions; the limit is {MAX_QUESTIONS} per job")
    return {"questions": questions}


def _classify(params: dict[str, Any]) -> dict[str, Any]:
    _reject_unknown_keys("classify", params, {"labels", "multi_label"})
    if "labels" not in params:
        raise _invalid("classify needs 'labels': a list of at least 2 distinct strings")
    labels = _clean_strings("labels", params["labels"], max_chars=MAX_LABEL_CHARS)
    if len(labels) < MIN_LABELS:
        raise _invalid(f"classify needs at least {MIN_LABELS} labels, got {len(labels)}")
    if len(labels) > MAX_LABELS:
        raise _invalid(f"{len(labels)} labels; the limit is {MAX_LABELS}")
    seen: dict[str, str] = {}
    for label in labels:
        key = label.casefold()
        if key in seen:
            raise _invalid(f"duplicate label {label!r} (same as {seen[key]!r})")
        seen[key] = label
    multi_label = params.get("multi_label", False)
    if not isinstance(multi_label, bool):
        raise _invalid(f"multi_label must be true or false, got {type(multi_label).__name__}")
    return {"labels": labels, "multi_label": multi_label}


_VALIDATORS = {"summarize": _summarize, "qa": _qa, "classify": _classify}


def validate_params(task: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Return normalized params for `task`, or raise PipelineError("invalid_params", why)."""
    if task not in _VALIDATORS:
        raise _invalid(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _invalid(f"params must be a JSON object, got {type(params).__name__}")
    return _VALIDATORS[task](params)
