"""The task registry: params validation (every malformed job request is refused with invalid_params
and a clear message), defaults, result models, and what derives from the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.tasks import REGISTRY, TASKS, validate_params, validate_result
from pipeline.tasks.schemas import DEFAULT_LABELS
from pipeline.types import PipelineError


def _refused(task, params) -> str:
    with pytest.raises(PipelineError) as info:
        validate_params(task, params)
    assert info.value.code == "invalid_params"
    return info.value.message


def test_defaults_and_normalization():
    assert validate_params("summarize", {}) == {"max_words": 200, "style": "paragraph"}
    assert validate_params("summarize", None) == {"max_words": 200, "style": "paragraph"}
    assert validate_params("summarize", {"max_tokens": 256, "style": "bullets", "focus": "  late  fees "}) == {
        "max_tokens": 256, "style": "bullets", "focus": "late fees"}
    assert validate_params("qa", {"question": "  Who   signs? "}) == {"questions": ["Who signs?"]}
    assert validate_params("qa", {"questions": ["a?", "b?"]}) == {"questions": ["a?", "b?"]}
    assert validate_params("classify", {"labels": ["contract", " paper "]}) == {
        "labels": ["contract", "paper"], "multi_label": False}
    assert validate_params("classify", {"labels": ["a", "b"], "multi_label": True})["multi_label"] is True
    # no labels: classify by document type
    assert validate_params("classify", {}) == {"labels": list(DEFAULT_LABELS), "multi_label": False}
    assert DEFAULT_LABELS == ("contract", "report", "paper", "form", "other")


def test_validation_is_idempotent():
    """Workers validate again what the API already normalized: the result must not change."""
    for task, params in [("summarize", {"max_words": 30}), ("summarize", {"max_tokens": 64, "focus": "x"}),
                         ("qa", {"question": "x  y"}), ("classify", {}),
                         ("classify", {"labels": ["a", "b"], "multi_label": True})]:
        once = validate_params(task, params)
        assert validate_params(task, once) == once


def test_unknown_task():
    assert "unknown task 'translate'" in _refused("translate", {})


@pytest.mark.parametrize("params, fragment", [
    ([1, 2], "must be a JSON object"),
    ({"max_words": "100"}, "max_words: Input should be a valid integer"),
    ({"max_words": True}, "max_words: Input should be a valid integer"),
    ({"max_words": 2.5}, "max_words: Input should be a valid integer"),
    ({"max_words": 0}, "greater than or equal to 10"),
    ({"max_words": 10**6}, "less than or equal to 5000"),
    ({"max_words": 100, "max_tokens": 100}, "either max_words or max_tokens"),
    ({"style": "haiku"}, "style: Input should be 'paragraph' or 'bullets'"),
    ({"focus": "   "}, "focus is empty"),
    ({"max_words": 100, "tone": "dry"}, "tone: unknown param"),
])
def test_summarize_refusals(params, fragment):
    assert fragment in _refused("summarize", params)


@pytest.mark.parametrize("params, fragment", [
    ({}, "questions: Field required"),
    ({"questions": []}, "at least 1 item"),
    ({"questions": "what?"}, "questions: Input should be a valid list"),
    ({"questions": ["ok?", 3]}, "questions.1: Input should be a valid string"),
    ({"questions": ["ok?", "   "]}, "questions[1] is empty"),
    ({"question": ""}, "questions[0] is empty"),
    ({"question": ["a?"]}, "questions.0: Input should be a valid string"),
    ({"question": "a?", "questions": ["b?"]}, "either 'question' or 'questions'"),
    ({"questions": [f"q{i}?" for i in range(21)]}, "at most 20 items"),
    ({"questions": ["x" * 1001]}, "1001 characters; the limit is 1000"),
    ({"questions": ["a?"], "top_k": 3}, "top_k: unknown param"),
])
def test_qa_refusals(params, fragment):
    assert fragment in _refused("qa", params)


@pytest.mark.parametrize("params, fragment", [
    ({"labels": ["only"]}, "at least 2 items"),
    ({"labels": []}, "at least 2 items"),
    ({"labels": "a,b"}, "labels: Input should be a valid list"),
    ({"labels": ["a", None]}, "labels.1: Input should be a valid string"),
    ({"labels": ["Contract", "contract"]}, "duplicate label 'contract'"),
    ({"labels": ["a", " "]}, "labels[1] is empty"),
    ({"labels": [f"l{i}" for i in range(51)]}, "at most 50 items"),
    ({"labels": ["a", "b"], "multi_label": "yes"}, "multi_label: Input should be a valid boolean"),
    ({"labels": ["a", "b"], "threshold": 0.5}, "threshold: unknown param"),
])
def test_classify_refusals(params, fragment):
    assert fragment in _refused("classify", params)


def test_every_task_has_params_result_and_both_strategies():
    assert TASKS == tuple(REGISTRY) == ("summarize", "qa", "classify")
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.description
        assert set(spec.strategies) == {"extractive", "mpt"}
        assert spec.has_strategy("extractive")
        assert spec.strategies["mpt"] == f"pipeline.tasks.mpt.{name}:run"
        spec.params.model_validate(validate_params(name, {"questions": ["q?"]} if name == "qa" else {}))


def test_results_are_checked_against_their_model():
    good = {"label": "contract", "labels": ["contract"], "scores": {"contract": 0.9, "paper": 0.1},
            "method": "extractive", "engine": "extractive", "model": "m"}
    assert validate_result("classify", good) == good
    for bad in ({**good, "ranking": ["contract"]}, {k: v for k, v in good.items() if k != "scores"},
                {**good, "engine": "gpt"}):
        with pytest.raises(PipelineError) as info:
            validate_result("classify", bad)
        assert info.value.code == "model_error" and "does not match its schema" in info.value.message
    evidence = {"text": "x", "page_start": 0, "page_end": 1, "char_start": 0, "char_end": 1}  # page 0
    with pytest.raises(PipelineError, match="page_start"):
        validate_result("qa", {"answers": [{"question": "q", "answer": "a", "evidence": [evidence],
                                            "confidence": 0.5}], "method": "m", "engine": "mpt", "model": "m"})


def test_storage_enum_and_openapi_derive_from_the_registry():
    from storage.models import TaskName

    assert [t.value for t in TaskName] == list(TASKS)
    from api.schemas import JobPublic

    schema = JobPublic.model_json_schema()
    refs = {item.get("$ref", "").rsplit("/", 1)[-1] for item in schema["properties"]["result"]["anyOf"]}
    assert {spec.result.__name__ for spec in REGISTRY.values()} <= refs


def test_importing_tasks_does_not_import_torch():
    """The API process imports pipeline.tasks for validation and must stay free of torch."""
    code = ("import sys, pipeline.tasks as t, pipeline.tasks.extractive.segments; "
            "t.validate_params('qa', {'question': 'x'}); t.tokenizer_spec('auto', model='m', embedding_model='e'); "
            "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_upload_classify_without_labels_uses_the_default_labels():
    from api.routes.documents import _requested_jobs

    assert _requested_jobs("classify", [], None) == [("classify", {"labels": list(DEFAULT_LABELS),
                                                                   "multi_label": False})]
