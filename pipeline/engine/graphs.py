"""The decode step over static buffers, and the same step captured once into a CUDA graph.

Batch-1 decode of a 7B model is ~700 small kernels per token; launching them one by one from Python
costs more than the weights take to read. Replaying them from one CUDA graph removes the launch cost
(H200, MPT-7B shape: 4.82 ms/token at 4K context, 12.05 ms at 65K with the fused kernels and the
device-side token loop, eager 13.8 ms at 4K; bench/NOTES.md run 9), where
`torch.compile(mode="reduce-overhead")` of the same step copies the whole KV cache several times per
step (36.9 / 425 ms, functionalized `k_cache[rows, positions] = k` on per-layer views of the cache).

A graph replays fixed addresses, so the step reads its inputs from buffers owned here. Two ways to
drive it: call it with tokens / positions (copied in; returns the static logits tensor, which the next
call overwrites), or `start` once and `advance` per token: then the next token is picked on the device
(greedy argmax inside the graph; sampling right after it on the stream), written into the tokens
buffer and the positions bumped, so the host never has to hand anything back in (generate.py reads
the tokens back asynchronously, one step behind). One step object serves one cache (its batch size
and length are baked into the graph); make a new one per cache. `StaticDecodeStep` is the same
bookkeeping run eagerly, so everything but the capture itself runs on CPU too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pipeline.engine.cache import KVCache
from pipeline.engine.model import Mpt

log = logging.getLogger(__name__)

# PyTorch's CUDA-graph recipe: run the step a few times on a side stream before capture, so lazy
# initialisation (cuBLAS workspaces, Triton autotuning / JIT, allocator growth) happens outside it.
WARMUP_STEPS = 2


Decode = Callable[[torch.Tensor, KVCache, torch.Tensor], torch.Tensor]  # (tokens, cache, positions) -> logits
Pick = Callable[[torch.Tensor], torch.Tensor]  # float32 logits [B, V] -> next tokens [B] int64, no host sync


class StaticDecodeStep:
    """`decode(tokens, cache, positions)` (default `model.decode`) for one cache, inputs and output in
    static buffers.

    Call with tokens [B] and positions [B] (int64, on the model's device); returns float32 logits
    [B, vocab] that stay valid until the next call. With `pick`, `start` + `advance` run the
    token loop on the device: each advance decodes the buffered tokens, writes pick(logits) into
    the tokens buffer and adds 1 to the positions."""

    def __init__(self, model: Mpt, cache: KVCache, *, decode: Decode | None = None, pick: Pick | None = None) -> None:
        self.model, self.cache = model, cache
        self.decode = decode if decode is not None else model.decode
        self.pick = pick
        batch = cache.batch
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)  # [B]
        self.positions = torch.zeros(batch, dtype=torch.long, device=model.device)  # [B]
        self.logits: torch.Tensor | None = None  # [B, vocab] float32, allocated by the first run
        self._advancing = False  # the step body also picks / bumps positions (set by start)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._load(tokens, positions)
        self._run()
        assert self.logits is not None
        return self.logits

    @torch.inference_mode()
    def start(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Load the first tokens [B] (picked from the prefill logits) and their positions [B]."""
        if self.pick is None:
            raise ValueError("start/advance need a step built with a pick function")
        self._load(tokens, positions)
        self._advancing = True

    @torch.inference_mode()
    def advance(self) -> None:
        """Decode the buffered tokens; the buffers then hold the next tokens and their positions.
        Only enqueues work: nothing is read back to the host."""
        if not self._advancing:
            raise RuntimeError("call start() before advance()")
        self._run()
        self._pick_outside()

    def _load(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        if tokens.shape != self.tokens.shape or positions.shape != self.positions.shape:
            raise ValueError(
                f"this decode step is for batch {self.cache.batch}: got tokens {tuple(tokens.shape)}, "
                f"positions {tuple(positions.shape)}"
            )
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)

    def _body(self, pick_inside: bool) -> torch.Tensor:
        """One decode step on the buffers; when advancing, also the position bump and (pick_inside)
        the pick, in place, after everything that reads them."""
        logits = self.decode(self.tokens, self.cache, self.positions)
        if self._advancing:
            if pick_inside:
                assert self.pick is not None
                self.tokens.copy_(self.pick(logits))
            self.positions.add_(1)
        return logits

    def _run(self) -> None:
        out = self._body(pick_inside=True)
        if self.logits is None:
            self.logits = out
        else:
            self.logits.copy_(out)  # same aliasing as a graph's static output

    def _pick_outside(self) -> None:
        """The pick when the step body does not contain it (eager: it always does)."""


class CudaGraphStep(StaticDecodeStep):
    """The step captured into one `torch.cuda.CUDAGraph` at its first run, replayed after.

    Capture happens lazily with the first real tokens / positions already in the buffers: the
    warm-up runs write those tokens' K/V into exactly the cache slots the first replay writes again
    with the same values, and the buffers they advance are restored, so warming up leaves nothing
    behind. With `capture_pick` the pick runs inside the graph (greedy argmax); otherwise (sampling:
    its RNG state is not captured) right after each replay. Either way a step is driven by one
    __call__ style or by start/advance, not both: which one is baked in at capture. Costs ~0.1-0.2 s
    at 4K context, ~1.3 s at 65K (H200), once per cache."""

    def __init__(
        self, model: Mpt, cache: KVCache, *, pick: Pick | None = None, capture_pick: bool = False
    ) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {model.device}")
        super().__init__(model, cache, pick=pick)
        self.capture_pick = capture_pick
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s: float | None = None

    def _run(self) -> None:
        if self.graph is None:
            self._capture()
        assert self.graph is not None
        self.graph.replay()

    def _pick_outside(self) -> None:
        if not self.capture_pick:
            assert self.pick is not None and self.logits is not None
            self.tokens.copy_(self.pick(self.logits))

    def _capture(self) -> None:
        start = time.perf_counter()
        device = self.model.device
        tokens, positions = self.tokens.clone(), self.positions.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._body(self.capture_pick)
                self.tokens.copy_(tokens)  # undo the warm-up's advance
                self.positions.copy_(positions)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._body(self.capture_pick)
        self.graph = graph
        self.capture_s = time.perf_counter() - start
        log.info(
            "captured the decode step: batch %d, cache length %d, pick %s, %.2f s",
            self.cache.batch, self.cache.max_len,
            "in graph" if self.capture_pick and self._advancing else "outside", self.capture_s,
        )


def run_token_loop(step: StaticDecodeStep, max_new_tokens: int, consume: Callable[[list[int]], bool]) -> int:
    """Drive a started step for up to `max_new_tokens` tokens (the first is already in its buffer);
    consume(tokens of one step, one int per row) returns True when every row has finished.
    Returns the number of tokens consumed per row.

    The host stays one step behind the GPU: step i's tokens are copied to pinned memory, step i + 1
    is enqueued, and only then does the host wait for step i's copy and check it. So the GPU never
    idles on the host's stop checks; when they end the loop, the step already enqueued is wasted
    and its tokens never reach `consume` (a finished row drops what follows anyway)."""
    reader = _HostTokens(step.tokens)
    for i in range(max_new_tokens):
        reader.put(step.tokens)
        if i < max_new_tokens - 1:
            step.advance()  # reads the tokens just queued for the host, then overwrites them
        if consume(reader.get()):
            return i + 1
    return max_new_tokens


class _HostTokens:
    """Token ids [B] from the device to the host without stalling the stream: a pinned buffer filled
    by an async copy, read once its event has passed (CUDA). Elsewhere the read is immediate."""

    def __init__(self, like: torch.Tensor) -> None:
        self.cuda = like.is_cuda
        self.pending: list[int] | None = None
        if self.cuda:
            self.host = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self.copied = torch.cuda.Event()

    def put(self, tokens: torch.Tensor) -> None:
        if self.cuda:
            self.host.copy_(tokens, non_blocking=True)
            self.copied.record()
        else:
            self.pending = tokens.tolist()

    def get(self) -> list[int]:
        if self.cuda:
            self.copied.synchronize()
            return self.host.tolist()
        assert self.pending is not None
        return self.pending
