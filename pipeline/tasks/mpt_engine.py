"""The MPT engine as the task strategies see it: a loaded ServingEngine plus what the tasks need to
know about it (kind, tokenizer spec for the chunker, model name for results).

One per worker process (pipeline.tasks.load_engine caches it); every job of every document in flight
submits to the same ServingEngine, whose thread owns the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

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


class MptTaskEngine:
    kind = "mpt"

    def __init__(self, serving: Any, *, model: str, embedding_model: str) -> None:
        self.serving = serving  # pipeline.engine.serving.ServingEngine
        self.tokenizer_spec = model  # documents read by MPT are chunked with MPT's own tokenizer
        self.model_name = model
        self.embedding_model = embedding_model

    @property
    def tokenizer(self) -> Any:
        return self.serving.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.serving.max_model_len)

    @classmethod
    def load(cls, model: str, *, device: str, embedding_model: str,
             options: ServingOptions | None = None) -> MptTaskEngine:
        import torch

        from pipeline.engine.load import CheckpointError
        from pipeline.engine.paged_cache import GIB
        from pipeline.engine.serving import EngineConfig, ServingEngine
        from pipeline.tasks import resolve_local_weights

        opts = options or ServingOptions()
        weights = resolve_local_weights(model)
        if weights is None:
            raise PipelineError("model_error", f"MPT weights {model!r} are not present locally")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError("model_error", "engine 'mpt' on cuda: no CUDA GPU is available")
        config = EngineConfig(
            block_size=opts.block_size,
            kv_cache_bytes=None if opts.kv_cache_gb is None else int(opts.kv_cache_gb * GIB),
            reserve_bytes=int(opts.kv_reserve_gb * GIB), max_num_seqs=opts.max_num_seqs,
            max_num_batched_tokens=opts.step_tokens, max_prefill_chunk=opts.prefill_chunk)
        try:
            serving = ServingEngine.load(weights, device=dev, max_seq_len=opts.max_seq_len, config=config)
        except (CheckpointError, ValueError, RuntimeError) as exc:  # bad checkpoint, pool does not fit
            raise PipelineError("model_error", f"MPT engine failed to load from {weights}: {exc}") from exc
        log.info("MPT engine: %s on %s, context %d tokens", weights, dev, serving.max_model_len)
        return cls(serving, model=str(model), embedding_model=embedding_model)
