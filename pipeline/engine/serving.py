"""The serving engine: requests in, results out, many at once, one thread owning the device.

`submit(request) -> Future` and `cancel(request_id)` may be called from any thread; they only put
work into an inbox. The engine thread drains the inbox, asks the scheduler (torch-free,
pipeline/engine/core/scheduler.py) for a step plan, has the runner launch it, and applies the
sampled tokens (request_book.py: stop strings, end-of-text, token limits, Futures).

Async scheduling (in the manner of vLLM v1's async scheduler): each `step` launches step N and only
then waits for step N - 1's tokens and applies them, so while the device runs step N the host
applies N - 1, plans N + 1 (each running decode row assumed to produce its token: a scheduler
placeholder, the id still on the device) and launches it; the device never waits for the host's
per-step work. A row that a stop string, stop id or end-of-text ends is found one step late: the
token its next step computed is dropped and its blocks go back to the pool. Off CUDA the launch has
already run when it returns, but the order of planning and applying is the same, so the CPU tests
exercise one-step-behind. `EngineConfig.async_scheduling=False` applies each step's tokens before
the next plan (the synchronous engine, kept for comparison).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.core.requests import EngineError, GenerateRequest, ScoreRequest
from pipeline.engine.core.scheduler import Scheduler, SchedulerOutput, Sequence
from pipeline.engine.model import Mpt
from pipeline.engine.paged_cache import GIB, PagedKVCache, bytes_per_token, plan_pool
from pipeline.engine.readback import StepReadback
from pipeline.engine.request_book import RequestBook, Tracked
from pipeline.engine.runner import ModelRunner
from pipeline.engine.step_trace import StepTrace
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
    async_scheduling: bool = True  # plan step N + 1 while step N runs; tokens read one step behind
    # the process's GIL switch interval once the engine thread runs on CUDA (None: Python's, 5 ms). Each
    # torch call releases the GIL and takes it back, so each of an eager prefill's ~700 calls can wait
    # up to the interval for a job thread busy in Python (citations, retrieval) while the device idles.
    # Its gain is not separated yet: run 2's 2,027 -> 2,557 documents/hour also compared an engine's
    # first pass with a second, and the one pair differing in it alone (16 documents in flight) showed
    # none (bench/NOTES.md session 6, run 3's correction). Off CUDA it is left alone (not measured there)
    gil_switch_interval_s: float | None = 0.0005
    # a step's prefill chunks as one forward (chunk_prefill.py). H200, the tasks bench's corpus on a warm
    # engine: 38.5 s with, 42.0 s without (bench/NOTES.md session 7, run 1)
    batch_prefills: bool = True


@dataclass
class _Launched:
    """A launched step: its plan, its results on the way, and the request record each row belonged to
    at launch (a row whose request has ended or been replaced since is ignored when it lands)."""

    out: SchedulerOutput
    readback: StepReadback
    owners: dict[str, Tracked | None]
    scoring: dict[str, tuple[Sequence, int]]  # seq id -> (seq, num_preemptions at launch): preempted since,
    # its positions are recomputed and these scores are stale
    trace_index: int = -1  # its StepTrace record, when the engine traces


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
                                  max_model_len=self.max_model_len, cuda_graphs=cfg.cuda_graphs,
                                  batch_prefills=cfg.batch_prefills)
        self.book = RequestBook(self.scheduler, tokenizer, model.device, self.max_model_len)
        self.async_scheduling = cfg.async_scheduling  # switchable between steps (benchmarks compare both)
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._in_flight: _Launched | None = None  # the launched step whose tokens are not applied yet
        self._steps = 0
        self.busy_s = 0.0  # wall time inside steps (the engine thread's share of the device's work)
        self.launch_s = 0.0  # of which: queuing steps on the device (host work the device may wait for)
        self.wait_s = 0.0  # and waiting for a step's results (the device ahead of the host)
        self.trace: StepTrace | None = None  # per-step record, off unless set (benchmarks)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if start_thread:
            self.start()

    def start(self) -> None:
        """Run the engine loop on its own thread (what a service does; tests may step by hand instead)."""
        if self._thread is None:
            if self.config.gil_switch_interval_s is not None and self.device.type == "cuda":
                log.info("GIL switch interval %.4f s (was %.4f s)", self.config.gil_switch_interval_s,
                         sys.getswitchinterval())
                sys.setswitchinterval(self.config.gil_switch_interval_s)
            self._thread = threading.Thread(target=self._loop, name="longdoc-engine", daemon=True)
            self._thread.start()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def threaded(self) -> bool:
        """Whether the engine runs on its own thread (else the caller steps it: run_until_idle)."""
        return self._thread is not None

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

    def reset_prefix_cache(self) -> Future:
        """Drop every cached block's content (the warm-up's synthetic prefixes). Resolves to True, or to
        False when some block is still held. Runs on the engine thread, in inbox order: after the
        submits and cancels sent before it, before any sent after it."""
        future: Future = Future()
        if self._stop.is_set():  # no engine thread drains the inbox any more
            future.set_result(False)
            return future
        self._inbox.put(("reset_prefix_cache", future))
        self._wake.set()
        return future

    def stats(self) -> dict[str, int]:
        return {**self.book.counters, "steps": self._steps, **self.scheduler.stats(),
                "busy_ms": int(self.busy_s * 1000), "launch_ms": int(self.launch_s * 1000),
                "wait_ms": int(self.wait_s * 1000)}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drain_inbox()
        self._in_flight = None
        self.book.fail_all(EngineError("shutdown", "the engine shut down before the request finished"))

    # --- the engine thread --------------------------------------------------------------------

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a bug or a device fault: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._in_flight = None
                self.book.fail_all(EngineError("engine_error", f"{type(exc).__name__}: {exc}"))

    def run_until_idle(self) -> None:
        """Step on the calling thread until nothing is left (engines built with start_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this engine has its own thread; wait on the futures instead")
        self._drain_inbox()
        while self.has_work():
            self.step()
            self._drain_inbox()

    def step(self) -> None:
        start = time.perf_counter()
        try:
            self._step()
        finally:
            self.busy_s += time.perf_counter() - start

    def _step(self) -> None:
        """Plan and launch step N, then apply step N - 1's tokens (async) or step N's own (sync)."""
        out = self.scheduler.schedule()
        for seq in out.finished:
            self.book.seq_failed(seq)
        for seq_id in out.preempted:
            self.book.drop_scores(seq_id)
        launched = None
        if out.decodes or out.prefills:
            launched = self._launch(out)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._apply(previous)
        if not self.async_scheduling and self._in_flight is not None:
            launched, self._in_flight = self._in_flight, None
            self._apply(launched)

    def _launch(self, out: SchedulerOutput) -> _Launched:
        planned = [*out.decodes, *out.prefills]
        owners = {p.seq.seq_id: self.book.of(p.seq.seq_id) for p in planned}
        scoring = {p.seq.seq_id: (p.seq, p.seq.num_preemptions) for p in out.prefills if p.seq.score_from is not None}
        start = time.perf_counter()
        readback = self.runner.launch(out, self.book.sampling)
        launch_s = time.perf_counter() - start
        self.launch_s += launch_s
        self.scheduler.update(out)  # computed counts + placeholders: the next plan builds on this one
        self._steps += 1
        trace_index = -1
        if self.trace is not None:
            trace_index = self.trace.launched(start, launch_s, len(out.decodes),
                                              tuple(p.num_tokens for p in out.prefills))
        return _Launched(out, readback, owners, scoring, trace_index)

    def _apply(self, launched: _Launched) -> None:
        start = time.perf_counter()
        result = launched.readback.result()
        wait_s = time.perf_counter() - start
        self.wait_s += wait_s
        if self.trace is not None:
            self.trace.waited(launched.trace_index, wait_s)
        for seq_id, values in result.scored.items():
            seq, epoch = launched.scoring[seq_id]
            tracked = launched.owners[seq_id]
            if seq.num_preemptions == epoch and tracked is not None:
                self.book.add_scores(seq_id, tracked, values)
        for seq_id, (token, logprob) in result.sampled.items():
            tracked = launched.owners[seq_id]
            if tracked is not None:
                self.book.accept(seq_id, tracked, token, logprob)
        for chunk in launched.out.prefills:  # scoring sequences whose last chunk this was
            seq, tracked = chunk.seq, launched.owners[chunk.seq.seq_id]
            if seq.score_from is None or tracked is None or chunk.start + chunk.num_tokens < len(seq.token_ids):
                continue
            if seq.num_preemptions == launched.scoring[seq.seq_id][1]:
                self.book.score_done(seq, tracked)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self.book.add(*payload)
            elif kind == "reset_prefix_cache":
                payload.set_result(self.scheduler.kv.pool.reset_prefix_cache())
            else:
                self.book.cancel(payload)
