"""The engine object the MPT strategies receive: a loaded ServingEngine plus what the tasks need to know
about it (kind, tokenizer spec for the chunker, model name for results and prompt family, embedder).

One per worker process (pipeline.tasks.load_engine loads it through the registry's MPT_LOADER as
`load_engine(model=..., device=..., embedding_model=...)`; workers add `options` and `prompt_family`
from settings); every job of every document in flight submits to the same ServingEngine, whose
thread owns the device.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.tasks.mpt.prompts import PROMPT_FAMILY_SETTINGS
from pipeline.types import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingOptions:
    """The serving engine's knobs, filled from settings by the caller (workers pass Settings fields)."""

    max_seq_len: int | None = None
    block_size: int = 256
    kv_cache_gb: float | None = None
    kv_reserve_gb: float = 8.0
    max_num_seqs: int = 64
    step_tokens: int = 16384
    prefill_chunk: int = 16384
    warmup: bool = True  # run pipeline/engine/warmup.py's synthetic requests before returning the engine


class MptEngine:
    kind = "mpt"

    def __init__(self, serving: Any, *, model: str, embedding_model: str | None = None,
                 prompt_family: str = "auto") -> None:
        if prompt_family not in PROMPT_FAMILY_SETTINGS:
            raise ValueError(f"prompt_family must be one of {', '.join(PROMPT_FAMILY_SETTINGS)}, not {prompt_family!r}")
        self.serving = serving  # pipeline.engine.serving.ServingEngine
        self.tokenizer_spec = model  # documents read by MPT are chunked with MPT's own tokenizer
        self.model_name = model  # as asked for (a hub id names the family; its cache dir does not)
        self.embedding_model = embedding_model
        self.prompt_family = prompt_family

    @functools.cached_property
    def embedder(self) -> Any:
        """Retrieval's embedding half (the extractive backend's cached embeddings), or None: BM25 only."""
        if not self.embedding_model:
            return None
        from pipeline.tasks import extractive_backend

        return extractive_backend(self.embedding_model)

    def shutdown(self) -> None:
        self.serving.shutdown()


def engine_config(opts: ServingOptions) -> Any:
    """The EngineConfig a document-jobs engine runs with (load_engine's, and bench/tasks_mpt.py's)."""
    from pipeline.engine.paged_cache import GIB
    from pipeline.engine.serving import EngineConfig

    return EngineConfig(
        block_size=opts.block_size,
        kv_cache_bytes=None if opts.kv_cache_gb is None else int(opts.kv_cache_gb * GIB),
        reserve_bytes=int(opts.kv_reserve_gb * GIB), max_num_seqs=opts.max_num_seqs,
        max_num_batched_tokens=opts.step_tokens, max_prefill_chunk=opts.prefill_chunk)


def load_engine(*, model: str, device: str, embedding_model: str, options: ServingOptions | None = None,
                prompt_family: str = "auto") -> MptEngine:
    """Load the checkpoint into a ServingEngine; model_error when it cannot run here."""
    import torch

    from pipeline.engine.load import CheckpointError
    from pipeline.engine.serving import ServingEngine
    from pipeline.tasks import resolve_local_weights

    opts = options or ServingOptions()
    weights = resolve_local_weights(model)
    if weights is None:
        raise PipelineError("model_error", f"MPT weights {model!r} are not present locally")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("model_error", "engine 'mpt' on cuda: no CUDA GPU is available")
    config = engine_config(opts)
    try:
        serving = ServingEngine.load(weights, device=dev, max_seq_len=opts.max_seq_len, config=config)
    except (CheckpointError, ValueError, RuntimeError) as exc:  # bad checkpoint, pool does not fit
        raise PipelineError("model_error", f"MPT engine failed to load from {weights}: {exc}") from exc
    log.info("MPT engine: %s on %s, context %d tokens", weights, dev, serving.max_model_len)
    if opts.warmup:  # kernel compiles and graph captures now, not on the first documents
        from pipeline.engine.warmup import warm_up

        warm_up(serving)
    return MptEngine(serving, model=str(model), embedding_model=embedding_model, prompt_family=prompt_family)
