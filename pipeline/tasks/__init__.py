"""Model tasks (summarize, qa, classify) and the engine they run on.

Public API (what the API, the workers and `longdoc run` build against):
    TASKS, REGISTRY                                   the task registry (pipeline/tasks/registry.py)
    validate_params(task, params) -> dict            pure Python, safe in the API process
    load_engine(kind, *, model, device, embedding_model) -> Engine   once per worker process
    run_task(engine, task, params, doc, progress) -> dict            JSON result, validated by its model
    tokenizer_spec(kind, *, model, embedding_model) -> str           which tokenizer the chunker uses

"engine" is what load_engine returns: the MPT runtime (kind "mpt") or the CPU extractive backend
(kind "extractive", pipeline/tasks/extractive/). Importing this package never imports torch (the API
imports it for validation); the heavy imports happen inside load_engine and the strategies.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Protocol

from pipeline.tasks.progress import Progress
from pipeline.tasks.registry import (
    REGISTRY,
    TASKS,
    load_mpt_engine,
    mpt_tasks_available,
    task_spec,
    validate_params,
    validate_result,
)
from pipeline.types import DocumentText, PipelineError

log = logging.getLogger(__name__)

__all__ = ["REGISTRY", "TASKS", "Engine", "Progress", "load_engine", "run_task", "tokenizer_spec",
           "validate_params", "validate_result"]

ENGINE_CHOICES = ("auto", "mpt", "extractive")


class Engine(Protocol):
    """What run_task needs to know about a loaded engine."""

    kind: str  # "extractive" | "mpt": the registry picks the task strategy by it
    tokenizer_spec: str  # the tokenizer the chunker should use for documents this engine reads


def resolve_local_weights(model: str) -> Path | None:
    """A local directory holding the checkpoint `model` (a dir or a hub id already cached), else None.

    Never downloads: workers must not block on (or depend on) the network.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path if _has_weights(path) else None
    if "/" not in model or model.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure here just means "not available locally"
        log.debug("no local snapshot of %s: %s", model, exc)
        return None
    return cached if _has_weights(cached) else None


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in path.iterdir())


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _mpt_unavailable_reason(model: str, device: str) -> str | None:
    """Why MPT cannot run in this process on `device`, or None when it can. A CPU device is allowed
    when asked for explicitly (slow; small checkpoints and tests)."""
    if device != "cpu" and not _cuda_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if resolve_local_weights(model) is None:
        return f"MPT weights {model!r} are not present locally (a local dir or a cached hub snapshot)"
    if not mpt_tasks_available():
        return "the MPT-backed task path is not built in this version"
    return None


def load_engine(kind: str, *, model: str, device: str, embedding_model: str,
                mpt_options: dict[str, Any] | None = None) -> Engine:
    """Load the engine once per worker process.

    kind: "extractive" = CPU sentence-embedding backend; "mpt" = MPT (model_error naming the reason
    when it cannot run here); "auto" = MPT when a CUDA GPU, local weights and the MPT task path are all
    present, else extractive, with the reason logged. `mpt_options` go to the MPT loader
    (pipeline.tasks.mpt.engine.load_engine: options=ServingOptions(...), prompt_family=...).
    """
    if kind not in ENGINE_CHOICES:
        raise PipelineError("model_error", f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_CHOICES)}")
    if kind in ("auto", "mpt"):
        reason = _mpt_unavailable_reason(model, device if kind == "mpt" else "cuda")
        if reason is None:
            return load_mpt_engine(model=model, device=device if kind == "mpt" else "cuda",
                                   embedding_model=embedding_model, **(mpt_options or {}))
        if kind == "mpt":
            raise PipelineError("model_error", f"engine 'mpt' cannot run: {reason}")
        log.info("engine auto -> extractive: %s", reason)
    return extractive_backend(embedding_model)


@functools.lru_cache(maxsize=2)
def extractive_backend(embedding_model: str) -> Engine:
    """One backend per process and embedding model: workers, the embedded pool and the MPT strategies
    (which embed for retrieval) share it."""
    from pipeline.tasks.extractive.backend import ExtractiveBackend

    return ExtractiveBackend.load(embedding_model)


def tokenizer_spec(kind: str, *, model: str, embedding_model: str) -> str:
    """The tokenizer spec the chunker should use for documents the `kind` engine will read.

    Decided without torch or CUDA (parse workers are CPU machines): "auto" answers the MPT
    checkpoint when the MPT path exists and its weights are present locally, else the embedding
    model. The extractive backend works on sentences, so it copes with chunks of either tokenizer.
    """
    if kind == "extractive":
        return embedding_model
    if kind == "mpt":
        return model
    if kind == "auto":
        if mpt_tasks_available() and resolve_local_weights(model) is not None:
            return model
        return embedding_model
    raise PipelineError("model_error", f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_CHOICES)}")


def run_task(engine: Engine, task: str, params: dict[str, Any], doc: DocumentText,
             progress: Progress) -> dict[str, Any]:
    """Run one task on one document: the registry's strategy for engine.kind, its result validated
    against the task's result model (the same schema whichever engine ran)."""
    spec = task_spec(task)
    params = validate_params(task, params)
    if not doc.full_text.strip():
        raise PipelineError("no_text_layer", "the document has no text to run a task on")
    run = spec.strategy(getattr(engine, "kind", ""))
    progress(0.0, "starting")
    result = validate_result(task, run(engine, doc, params, progress))
    progress(1.0, "done")
    return result
