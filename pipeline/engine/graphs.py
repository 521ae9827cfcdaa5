"""The decode step over static buffers, and the same step captured once into a CUDA graph.

Batch-1 decode of a 7B model is ~700 small kernels per token; launching them one by one from Python
costs more than the weights take to read. Replaying them from one CUDA graph removes the launch cost
(H200, MPT-7B shape: 5.68 ms/token at 4K context, 13.03 ms at 65K; bench/NOTES.md run 4), where
`torch.compile(mode="reduce-overhead")` of the same step copies the whole KV cache several times per
step (36.9 / 425 ms, functionalized `k_cache[rows, positions] = k` on per-layer views of the cache).

A graph replays fixed addresses, so the step reads its inputs from buffers owned here: each call
copies the new tokens / positions in, runs, and hands back the static logits tensor, which the next
call overwrites (consume it first). One step object serves one cache (its batch size and length are
baked into the graph); make a new one per cache. `StaticDecodeStep` is the same bookkeeping run
eagerly, so everything but the capture itself runs on CPU too.
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline.engine.cache import KVCache
from pipeline.engine.model import Mpt

log = logging.getLogger(__name__)

# PyTorch's CUDA-graph recipe: run the step a few times on a side stream before capture, so lazy
# initialisation (cuBLAS workspaces, Triton autotuning / JIT, allocator growth) happens outside it.
WARMUP_STEPS = 2


class StaticDecodeStep:
    """`model.decode(tokens, cache, positions)` for one cache, inputs and output in static buffers.

    Call with tokens [B] and positions [B] (int64, on the model's device); returns float32 logits
    [B, vocab] that stay valid until the next call."""

    def __init__(self, model: Mpt, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        batch = cache.batch
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)  # [B]
        self.positions = torch.zeros(batch, dtype=torch.long, device=model.device)  # [B]
        self.logits: torch.Tensor | None = None  # [B, vocab] float32, allocated by the first run

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if tokens.shape != self.tokens.shape or positions.shape != self.positions.shape:
            raise ValueError(
                f"this decode step is for batch {self.cache.batch}: got tokens {tuple(tokens.shape)}, "
                f"positions {tuple(positions.shape)}"
            )
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self._run()
        assert self.logits is not None
        return self.logits

    def _run(self) -> None:
        out = self.model.decode(self.tokens, self.cache, self.positions)
        if self.logits is None:
            self.logits = out
        else:
            self.logits.copy_(out)  # same aliasing as a graph's static output


class CudaGraphStep(StaticDecodeStep):
    """The step captured into one `torch.cuda.CUDAGraph` at its first call, replayed after.

    Capture happens lazily with the first real tokens / positions already in the buffers: the
    warm-up runs write those tokens' K/V into exactly the cache slots the first replay writes again
    with the same values, so warming up leaves nothing behind. Costs ~0.2 s at 4K context, ~1.3 s at
    65K (H200), once per cache."""

    def __init__(self, model: Mpt, cache: KVCache) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {model.device}")
        super().__init__(model, cache)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s: float | None = None

    def _run(self) -> None:
        if self.graph is None:
            self._capture()
        assert self.graph is not None
        self.graph.replay()

    def _capture(self) -> None:
        start = time.perf_counter()
        device = self.model.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.model.decode(self.tokens, self.cache, self.positions)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.model.decode(self.tokens, self.cache, self.positions)
        self.graph = graph
        self.capture_s = time.perf_counter() - start
        log.info(
            "captured the decode step: batch %d, cache length %d, %.2f s",
            self.cache.batch, self.cache.max_len, self.capture_s,
        )
