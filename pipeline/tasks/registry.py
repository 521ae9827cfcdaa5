"""The task registry: the one place that knows which tasks exist.

Per task: its name, its params model (defaults included), its result model, and one strategy per
engine kind, named by import path and imported only when a job runs (so this module, and the API that
imports it, stay free of torch). The API's validation and OpenAPI result models, the storage enum of
task names and the CLI all read TASKS / REGISTRY instead of listing task names themselves.

A strategy is `run(engine, doc: DocumentText, params: dict, progress) -> dict`; `params` is already
normalized by the task's params model and the returned dict must validate against its result model.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.tasks import schemas
from pipeline.types import PipelineError

ENGINE_KINDS = ("extractive", "mpt")  # what a loaded engine's `kind` can be ("auto" resolves to one)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    params: type[BaseModel]
    result: type[BaseModel]
    strategies: Mapping[str, str]  # engine kind -> "package.module:function"

    def has_strategy(self, kind: str) -> bool:
        """True when the strategy module for `kind` exists (found without importing it)."""
        path = self.strategies.get(kind)
        return path is not None and _module_exists(path)

    def strategy(self, kind: str) -> Callable[..., dict[str, Any]]:
        path = self.strategies.get(kind)
        if path is None or not self.has_strategy(kind):
            raise PipelineError("model_error", f"no {self.name} strategy for engine kind {kind!r}")
        module, _, function = path.partition(":")
        return getattr(importlib.import_module(module), function)


def _spec(name: str, description: str, params: type[BaseModel], result: type[BaseModel]) -> TaskSpec:
    return TaskSpec(name, description, params, result, {
        "extractive": f"pipeline.tasks.extractive.{name}:run",
        "mpt": f"pipeline.tasks.mpt.{name}:run",
    })


REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _spec("summarize", "A summary of the document whose sentences cite their pages.",
          schemas.SummarizeParams, schemas.SummarizeResult),
    _spec("qa", "Answers to questions about the document, each citing its evidence.",
          schemas.QaParams, schemas.QaResult),
    _spec("classify", "Which of the labels (default: the document's type) fits the document.",
          schemas.ClassifyParams, schemas.ClassifyResult),
)}
TASKS: tuple[str, ...] = tuple(REGISTRY)


def task_spec(task: str) -> TaskSpec:
    spec = REGISTRY.get(task)
    if spec is None:
        raise PipelineError("invalid_params", f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return spec


def _explain(exc: ValidationError) -> str:
    """pydantic's errors as one line a client can act on: 'max_words: Input should be ...'."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown param"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def validate_params(task: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Normalized params for `task` (defaults filled in), or PipelineError("invalid_params", why).

    Idempotent: validating the output again gives the same dict (workers re-validate stored rows).
    """
    spec = task_spec(task)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise PipelineError("invalid_params", f"params must be a JSON object, got {type(params).__name__}")
    try:
        model = spec.params.model_validate(params)
    except ValidationError as exc:
        allowed = ", ".join(spec.params.model_fields)
        raise PipelineError("invalid_params", f"{task}: {_explain(exc)} (params: {allowed})") from None
    return model.model_dump(exclude_none=True)


def validate_result(task: str, result: dict[str, Any]) -> dict[str, Any]:
    """The result as its task's result model dumps it (JSON-ready), or model_error naming the defect:
    a strategy that returns another shape is a bug, not a user error."""
    spec = task_spec(task)
    try:
        return spec.result.model_validate(result).model_dump(mode="json")
    except ValidationError as exc:
        raise PipelineError("model_error", f"{task} result does not match its schema: {_explain(exc)}") from None


# How an MPT engine is loaded: `load_engine(*, model: str, device: str, embedding_model: str)`
# returning an object with kind == "mpt" and tokenizer_spec (the strategies get it as `engine`).
MPT_LOADER = "pipeline.tasks.mpt.engine:load_engine"


def _module_exists(path: str) -> bool:
    try:
        return importlib.util.find_spec(path.partition(":")[0]) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def mpt_tasks_available() -> bool:
    """Every task has an MPT strategy module and the MPT loader module exists (found without importing
    them; pipeline/tasks/mpt/__init__.py stays torch-free): until then nothing is routed to MPT."""
    return _module_exists(MPT_LOADER) and all(spec.has_strategy("mpt") for spec in REGISTRY.values())


def load_mpt_engine(*, model: str, device: str, embedding_model: str, **options: Any) -> Any:
    module, _, function = MPT_LOADER.partition(":")
    return getattr(importlib.import_module(module), function)(model=model, device=device,
                                                              embedding_model=embedding_model, **options)
