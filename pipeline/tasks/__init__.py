"""Model tasks (summarize, qa, classify) and the engine they run on.

Public API (what API and WORKERS build against):
    validate_params(task, params) -> dict            pure Python, safe in the API process
    load_engine(kind, *, model, device, embedding_model) -> Engine   once per worker process
    run_task(engine, task, params, doc, progress) -> dict            JSON-serializable result
    tokenizer_spec(kind, *, model, embedding_model) -> str           which tokenizer the chunker uses

Importing this package never imports torch or sentence-transformers (the API imports it for
validate_params); the heavy imports happen inside load_engine.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Protocol

from pipeline.tasks.params import TASKS, validate_params
from pipeline.tasks.progress import Progress
from pipeline.types import DocumentText, PipelineError

log = logging.getLogger(__name__)

__all__ = ["TASKS", "Engine", "Progress", "load_engine", "run_task", "tokenizer_spec", "validate_params"]

ENGINE_KINDS = ("auto", "mpt", "extractive")

# The MPT-backed task strategies (shared document prefix, prompts, label log-likelihoods) land with
# their own issue. Until then "auto" never picks MPT and "mpt" fails with a clear model_error, so no
# job is ever routed to a path that does not exist.
MPT_TASKS_AVAILABLE = False


class Engine(Protocol):
    """What the task strategies need to know about a loaded engine."""

    kind: str  # "extractive" | "mpt": the task modules pick their strategy by it
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


def _mpt_unavailable_reason(model: str) -> str | None:
    """Why MPT cannot run in this process, or None when it can."""
    if not _cuda_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if resolve_local_weights(model) is None:
        return f"MPT weights {model!r} are not present locally (a local dir or a cached hub snapshot)"
    if not MPT_TASKS_AVAILABLE:
        return "the MPT-backed task path is not built in this version"
    return None


def load_engine(kind: str, *, model: str, device: str, embedding_model: str) -> Engine:
    """Load the engine once per worker process.

    kind: "extractive" = CPU sentence-embedding engine; "mpt" = MPT on a CUDA GPU (model_error when
    it cannot run here); "auto" = MPT when it can run here, else extractive, with the reason logged.
    """
    if kind not in ENGINE_KINDS:
        raise PipelineError("model_error", f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")
    if kind in ("auto", "mpt"):
        reason = _mpt_unavailable_reason(model)
        if reason is None:
            raise PipelineError("model_error", "MPT engine selected but its task path is not wired")  # seam
        if kind == "mpt":
            raise PipelineError("model_error", f"engine 'mpt' cannot run: {reason}")
        log.info("engine auto -> extractive: %s", reason)
    return _extractive_engine(embedding_model)


@functools.lru_cache(maxsize=2)
def _extractive_engine(embedding_model: str) -> Engine:
    """One engine per process and embedding model: workers and the embedded pool may ask repeatedly."""
    from pipeline.extractive import ExtractiveEngine

    return ExtractiveEngine.load(embedding_model)


def tokenizer_spec(kind: str, *, model: str, embedding_model: str) -> str:
    """The tokenizer spec the chunker should use for documents the `kind` engine will read.

    Decided without torch or CUDA (parse workers are CPU machines): "auto" answers the MPT
    checkpoint when the MPT path exists and its weights are present locally, else the embedding
    model. The extractive engine works on sentences, so it copes with chunks of either tokenizer.
    """
    if kind == "extractive":
        return embedding_model
    if kind == "mpt":
        return model
    if kind == "auto":
        if MPT_TASKS_AVAILABLE and resolve_local_weights(model) is not None:
            return model
        return embedding_model
    raise PipelineError("model_error", f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")


def run_task(engine: Engine, task: str, params: dict[str, Any], doc: DocumentText,
             progress: Progress) -> dict[str, Any]:
    """Run one task on one document; returns a JSON-serializable result whose citations carry pages."""
    from pipeline.tasks import classify, qa, summarize

    params = validate_params(task, params)
    if not doc.full_text.strip():
        raise PipelineError("no_text_layer", "the document has no text to run a task on")
    runners = {"summarize": summarize.run, "qa": qa.run, "classify": classify.run}
    progress(0.0, "starting")
    result = runners[task](engine, doc, params, progress)
    progress(1.0, "done")
    return result
