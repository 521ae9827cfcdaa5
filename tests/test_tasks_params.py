"""validate_params: every malformed job request is refused with invalid_params and a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.tasks import validate_params
from pipeline.types import PipelineError


def _refused(task, params) -> str:
    with pytest.raises(PipelineError) as info:
        validate_params(task, params)
    assert info.value.code == "invalid_params"
    return info.value.message


def test_defaults_and_normalization():
    assert validate_params("summarize", {}) == {"max_words": 200}
    assert validate_params("summarize", None) == {"max_words": 200}
    assert validate_params("summarize", {"max_words": 50}) == {"max_words": 50}
    assert validate_params("qa", {"question": "  Who   signs? "}) == {"questions": ["Who signs?"]}
    assert validate_params("qa", {"questions": ["a?", "b?"]}) == {"questions": ["a?", "b?"]}
    assert validate_params("classify", {"labels": ["contract", " paper "]}) == {
        "labels": ["contract", "paper"], "multi_label": False}
    assert validate_params("classify", {"labels": ["a", "b"], "multi_label": True})["multi_label"] is True


def test_validation_is_idempotent():
    """Workers validate again what the API already normalized: the result must not change."""
    for task, params in [("summarize", {"max_words": 30}), ("qa", {"question": "x  y"}),
                         ("classify", {"labels": ["a", "b"], "multi_label": True})]:
        once = validate_params(task, params)
        assert validate_params(task, once) == once


def test_unknown_task():
    assert "unknown task 'translate'" in _refused("translate", {})


@pytest.mark.parametrize("params, fragment", [
    ([1, 2], "must be a JSON object"),
    ({"max_words": "100"}, "max_words must be an integer"),
    ({"max_words": True}, "max_words must be an integer"),
    ({"max_words": 2.5}, "max_words must be an integer"),
    ({"max_words": 0}, "between 10 and 5000"),
    ({"max_words": 10**6}, "between 10 and 5000"),
    ({"max_words": 100, "style": "bullets"}, "unknown param(s) for summarize: style"),
])
def test_summarize_refusals(params, fragment):
    assert fragment in _refused("summarize", params)


@pytest.mark.parametrize("params, fragment", [
    ({}, "qa needs 'questions'"),
    ({"questions": []}, "questions is empty"),
    ({"questions": "what?"}, "questions must be a list of strings"),
    ({"questions": ["ok?", 3]}, "questions must be a list of strings"),
    ({"questions": ["ok?", "   "]}, "questions[1] is empty"),
    ({"question": ""}, "questions[0] is empty"),
    ({"question": ["a?"]}, "question must be a string"),
    ({"question": "a?", "questions": ["b?"]}, "either 'question' or 'questions'"),
    ({"questions": [f"q{i}?" for i in range(21)]}, "21 questions; the limit is 20"),
    ({"questions": ["x" * 1001]}, "1001 characters; the limit is 1000"),
    ({"questions": ["a?"], "top_k": 3}, "unknown param(s) for qa: top_k"),
])
def test_qa_refusals(params, fragment):
    assert fragment in _refused("qa", params)


@pytest.mark.parametrize("params, fragment", [
    ({}, "classify needs 'labels'"),
    ({"labels": ["only"]}, "at least 2 labels, got 1"),
    ({"labels": []}, "at least 2 labels, got 0"),
    ({"labels": "a,b"}, "labels must be a list of strings"),
    ({"labels": ["a", None]}, "labels must be a list of strings"),
    ({"labels": ["Contract", "contract"]}, "duplicate label 'contract'"),
    ({"labels": ["a", " "]}, "labels[1] is empty"),
    ({"labels": [f"l{i}" for i in range(51)]}, "51 labels; the limit is 50"),
    ({"labels": ["a", "b"], "multi_label": "yes"}, "multi_label must be true or false"),
    ({"labels": ["a", "b"], "threshold": 0.5}, "unknown param(s) for classify: threshold"),
])
def test_classify_refusals(params, fragment):
    assert fragment in _refused("classify", params)


def test_importing_tasks_does_not_import_torch():
    """The API process imports pipeline.tasks for validation and must stay free of torch."""
    code = ("import sys, pipeline.tasks as t, pipeline.tasks.segments; t.validate_params('qa', {'question': 'x'}); "
            "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
