"""The serving engine: requests in, results out, many at once, one thread owning the device.

`submit(request) -> Future` and `cancel(request_id)` may be called from any thread; they only put
work into an inbox. The engine thread drains the inbox, asks the scheduler (torch-free,
pipeline/engine/core/scheduler.py) for a step plan, has the runner execute it, and feeds the sampled
tokens back: stop strings, end-of-text and token limits are judged here (TokenStream), a finished
request's Future is resolved, and its blocks go back to the pool, still findable by content. A
`ScoreRequest` becomes one scoring sequence per continuation; they share the prefix's blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.core.requests import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)
from pipeline.engine.core.scheduler import Scheduler, Sequence
from pipeline.engine.model import Mpt
from pipeline.engine.paged_cache import GIB, PagedKVCache, bytes_per_token, plan_pool
from pipeline.engine.runner import ModelRunner, SamplingState
from pipeline.engine.stream import TokenStream
from pipeline.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


CPU_POOL_CAP = 4 * GIB


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 256
    kv_cache_bytes: int | None = None  # cap on the KV pool (off CUDA default: 4 sequences, <= CPU_POOL_CAP)
    reserve_bytes: int = 8 * GIB  # CUDA memory kept out of the pool (prefill activations, graphs)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 16384
    max_prefill_chunk: int = 16384
    min_shared_tokens: int = 512  # decode rows sharing fewer prefix tokens are not grouped
    enable_prefix_caching: bool = True
    cuda_graphs: bool | None = None  # None: on CUDA


@dataclass
class _Tracked:
    """One submitted request and what the engine thread accumulates for it."""

    request: GenerateRequest | ScoreRequest
    future: Future
    seq_ids: list[str]
    stream: TokenStream | None = None
    logprobs: list[float] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    cached_tokens: int = 0


class ServingEngine:
    def __init__(self, model: Mpt, tokenizer: Tokenizer, config: EngineConfig | None = None, *,
                 model_name: str = "mpt", start_thread: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = cfg = config or EngineConfig()
        self.model_name = model_name
        self.max_model_len = model.config.max_seq_len
        kv_bytes = cfg.kv_cache_bytes
        if kv_bytes is None and model.device.type != "cuda":  # room for 4 full sequences, at most 4 GiB
            kv_bytes = min(4 * self.max_model_len * bytes_per_token(model.config, model.dtype), CPU_POOL_CAP)
        size = plan_pool(model.config, model.dtype, model.device, block_size=cfg.block_size, max_bytes=kv_bytes,
                         reserve_bytes=cfg.reserve_bytes, min_tokens=min(self.max_model_len, cfg.block_size))
        self.cache = PagedKVCache(model.config, size, device=model.device, dtype=model.dtype)
        self.scheduler = Scheduler(
            size.num_blocks, cfg.block_size, max_model_len=self.max_model_len,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_prefill_chunk=cfg.max_prefill_chunk,
            max_num_seqs=cfg.max_num_seqs, min_shared_tokens=cfg.min_shared_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching)
        self.runner = ModelRunner(model, self.cache, max_num_seqs=cfg.max_num_seqs,
                                  max_model_len=self.max_model_len, cuda_graphs=cfg.cuda_graphs)
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._tracked: dict[str, _Tracked] = {}  # request id -> state (engine thread only)
        self._owner: dict[str, str] = {}  # seq id -> request id
        self._sampling: dict[str, SamplingState] = {}
        self._arrival = 0
        self._counters = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "steps": 0, "failed": 0}
        self.busy_s = 0.0  # wall time inside steps (the engine thread's share of the device's work)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self.start()

    def start(self) -> None:
        """Run the engine loop on its own thread (what a service does; tests may step by hand instead)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="longdoc-engine", daemon=True)
            self._thread.start()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @classmethod
    def load(cls, spec: str | Path, *, device: torch.device | str = "cuda", dtype: torch.dtype | None = None,
             max_seq_len: int | None = None, config: EngineConfig | None = None,
             start_thread: bool = True) -> ServingEngine:
        """Model + tokenizer from a checkpoint dir or hub id (bf16 on CUDA, float32 elsewhere)."""
        from pipeline.engine.load import load

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, tokenizer = load(spec, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return cls(model, tokenizer, config, model_name=str(spec), start_thread=start_thread)

    # --- any thread ---------------------------------------------------------------------------

    def submit(self, request: GenerateRequest | ScoreRequest,
               on_done: Callable[[Future], None] | None = None) -> Future:
        future: Future = Future()
        if on_done is not None:
            future.add_done_callback(on_done)
        if self._stop.is_set():
            future.set_exception(EngineError("shutdown", "the engine has shut down"))
            return future
        self._inbox.put(("submit", (request, future)))
        self._wake.set()
        return future

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return {**self._counters, **self.scheduler.stats(), "busy_ms": int(self.busy_s * 1000)}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drain_inbox()
        for rid in list(self._tracked):
            self._fail(rid, EngineError("shutdown", "the engine shut down before the request finished"))

    # --- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a bug or a device fault: fail what is in flight, keep serving
                log.exception("engine step failed")
                for rid in list(self._tracked):
                    self._fail(rid, EngineError("engine_error", f"{type(exc).__name__}: {exc}"))

    def run_until_idle(self) -> None:
        """Step on the calling thread until nothing is left (engines built with start_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this engine has its own thread; wait on the futures instead")
        self._drain_inbox()
        while self.scheduler.has_work():
            self.step()
            self._drain_inbox()

    def step(self) -> None:
        start = time.perf_counter()
        try:
            self._step()
        finally:
            self.busy_s += time.perf_counter() - start

    def _step(self) -> None:
        out = self.scheduler.schedule()
        for seq in out.finished:
            self._seq_failed(seq)
        for seq_id in out.preempted:  # recomputed from scratch: its scored positions come again
            tracked = self._tracked.get(self._owner.get(seq_id, ""))
            if tracked is not None:
                tracked.scores.pop(seq_id, None)
        if not out.decodes and not out.prefills:
            return
        result = self.runner.execute(out, self._sampling)
        self.scheduler.update(out)
        self._counters["steps"] += 1
        for seq_id, values in result.scored.items():
            tracked = self._tracked.get(self._owner.get(seq_id, ""))
            if tracked is not None:
                tracked.scores.setdefault(seq_id, []).extend(values)
        for seq_id, (token, logprob) in result.sampled.items():
            self._accept(seq_id, token, logprob)
        for chunk in out.prefills:
            seq = chunk.seq
            if seq.score_from is not None and seq.num_computed >= len(seq.token_ids):
                self._score_done(seq)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._add(*payload)
            else:
                self._cancel(payload)

    def _add(self, request: GenerateRequest | ScoreRequest, future: Future) -> None:
        rid = request.request_id
        if rid in self._tracked:
            future.set_exception(EngineError("invalid_request", f"request id {rid!r} is already in flight"))
            return
        try:
            seqs = self._sequences(request)
        except EngineError as exc:
            future.set_exception(exc)
            return
        tracked = _Tracked(request, future, [s.seq_id for s in seqs])
        if isinstance(request, GenerateRequest):
            tracked.stream = TokenStream(self.tokenizer, request.params)
            gen = None
            if request.params.seed is not None and not request.params.is_greedy:
                gen = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self._sampling[seqs[0].seq_id] = SamplingState(request.params, gen)
        self._tracked[rid] = tracked
        self._counters["requests"] += 1
        for seq in seqs:
            self._owner[seq.seq_id] = rid
            self._counters["tokens_in"] += seq.prompt_len
            self.scheduler.add(seq)

    def _sequences(self, request: GenerateRequest | ScoreRequest) -> list[Sequence]:
        def seq(seq_id: str, ids: list[int], max_new: int, score_from: int | None) -> Sequence:
            self._arrival += 1
            return Sequence(seq_id=seq_id, token_ids=list(ids), prompt_len=len(ids), max_new_tokens=max_new,
                            score_from=score_from, arrival=self._arrival)

        if isinstance(request, GenerateRequest):
            if not request.prompt_ids:
                raise EngineError("invalid_request", "the prompt is empty")
            return [seq(request.request_id, request.prompt_ids, request.params.max_new_tokens, None)]
        if not request.prefix_ids or not request.continuations or any(not c for c in request.continuations):
            raise EngineError("invalid_request", "scoring needs a non-empty prefix and non-empty continuations")
        p = len(request.prefix_ids)
        return [seq(f"{request.request_id}/{i}", [*request.prefix_ids, *c], 0, p - 1)
                for i, c in enumerate(request.continuations)]

    def _accept(self, seq_id: str, token: int, logprob: float) -> None:
        rid = self._owner.get(seq_id)
        tracked = self._tracked.get(rid or "")
        if tracked is None or tracked.stream is None:
            return
        self.scheduler.append_token(seq_id, token)
        tracked.logprobs.append(logprob)
        self._counters["tokens_out"] += 1
        request = tracked.request
        assert isinstance(request, GenerateRequest)
        if request.on_token is not None:
            try:
                request.on_token(token)
            except Exception:  # a caller's callback must not take the engine down
                log.exception("on_token callback of %s failed", rid)
        stream = tracked.stream
        stream.push(token)
        if stream.finish_reason:
            seq = self.scheduler.finish(seq_id, stream.finish_reason)
            cached = seq.num_cached if seq is not None else 0
            completion = stream.completion(len(request.prompt_ids))
            self._resolve(rid, GenerateResult(
                text=completion.text, tokens=completion.tokens, finish_reason=completion.finish_reason,
                prompt_tokens=completion.prompt_tokens, cached_tokens=cached,
                logprobs=tracked.logprobs[: len(completion.tokens)]))

    def _score_done(self, seq: Sequence) -> None:
        rid = self._owner.get(seq.seq_id)
        tracked = self._tracked.get(rid or "")
        if tracked is None:
            return
        if seq.seq_id in tracked.done:
            return
        tracked.done.add(seq.seq_id)
        tracked.cached_tokens += seq.num_cached
        if len(tracked.done) < len(tracked.seq_ids):
            return
        per_token = [tracked.scores.get(sid, []) for sid in tracked.seq_ids]
        self._resolve(rid, ScoreResult(logprobs=[float(sum(t)) for t in per_token], token_logprobs=per_token,
                                       cached_tokens=tracked.cached_tokens))

    def _seq_failed(self, seq: Sequence) -> None:
        rid = self._owner.get(seq.seq_id)
        if rid is None or rid not in self._tracked:
            return
        reason = seq.finish_reason or "engine_error"
        if reason == "too_long":
            msg = (f"{len(seq.token_ids)} prompt tokens + {seq.max_new_tokens} new tokens do not fit the "
                   f"context of {self.max_model_len} tokens (or the KV pool)")
        else:
            msg = f"sequence {seq.seq_id} ended: {reason}"
        self._fail(rid, EngineError(reason if reason in ("too_long", "canceled") else "engine_error", msg))

    def _cancel(self, request_id: str) -> None:
        if request_id in self._tracked:
            self._fail(request_id, EngineError("canceled", f"request {request_id} was canceled"))

    def _fail(self, rid: str, error: EngineError) -> None:
        tracked = self._tracked.get(rid)
        if tracked is None:
            return
        for sid in tracked.seq_ids:
            self.scheduler.finish(sid, error.code)
        self._counters["failed"] += 1
        self._forget(rid)
        if not tracked.future.done():
            tracked.future.set_exception(error)

    def _resolve(self, rid: str, value: GenerateResult | ScoreResult) -> None:
        tracked = self._tracked.get(rid)
        if tracked is None:
            return
        for sid in tracked.seq_ids:
            self.scheduler.finish(sid, "done")
        self._forget(rid)
        if not tracked.future.done():
            tracked.future.set_result(value)

    def _forget(self, rid: str) -> None:
        tracked = self._tracked.pop(rid, None)
        if tracked is None:
            return
        for sid in tracked.seq_ids:
            self._owner.pop(sid, None)
            self._sampling.pop(sid, None)

