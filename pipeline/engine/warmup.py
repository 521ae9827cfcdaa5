"""Warm a freshly loaded ServingEngine up before it takes jobs (issue 10).

A new engine pays one-time costs on its first requests: flash-attn-4 JIT-compiles its prefill kernels
per compile key (a long document's exact-window plan compiled for ~50 s on the H200, bench/NOTES.md
"Tasks run 3"), and the runner captures one CUDA graph per decode batch-size bucket, with and without
prefix groups, at first use. `warm_up` pays them at load, through the engine's own submit path, so the
kernels, graphs and allocator growth are the ones real work needs:

- phase 1, a document: one long prompt (close to the context, capped so it fits the pool) continued by
  `fan_out` short suffixes. The first continuation prefills it, the others wait for its blocks and hit
  the prefix cache: their tails are prefilled over scattered blocks (the shared run, then a block of
  their own), and their decode rows form one prefix group (the cascade graphs). One ScoreRequest on
  the same document runs the scoring path.
- phase 2, `fan_out` independent short prompts: nothing shared, the plain decode graphs.

In each phase row r generates 1 + 2 * (number of buckets above r) tokens, so as rows finish the decode
batch shrinks through every bucket of buckets_for(fan_out): 64, 32, ..., 2, 1 by default. The spacing
of two steps keeps a row admitted a step late (the tails arrive over more than one step) from making
the batch jump over a bucket. Phase 1 captures the cascade graphs of buckets 2 and up: a group has two
rows at least, so a batch of one is always the plain graph.

Afterwards the prefix cache is reset (no block is held once every warm-up request has ended): the pool
is as a fresh engine's, so real documents get their blocks in the same order as without the warm-up.
Keeping the synthetic blocks would be harmless for results (a block is found by a 128-bit key of the
whole prefix, which random ids do not share with real text, and unheld cached blocks are evicted
least-recently-used), but they would sit in the pool until evicted. The engine's counters (`stats()`)
do count the warm-up's requests.

Before them, `compile_prefill` has the prefill backend compile its per-call kernels (flash-attn-4:
one per exact-window head-group start and window/causal flag, alibi_window.py): the plan follows the
activations, so random ids alone left some for the first real documents (bench/NOTES.md session 6
run 3: a compile in the first corpus pass, none after).
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass

from pipeline.engine.core.kv_manager import blocks_for
from pipeline.engine.core.requests import GenerateRequest, SamplingParams, ScoreRequest
from pipeline.engine.runner import buckets_for
from pipeline.engine.serving import ServingEngine

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 600.0
RESET_GRACE_S = 5.0  # after a timeout: how long to wait for the reset behind a step still running
SUFFIX_TOKENS = 8  # a task prompt after the document
SHORT_TOKENS = (16, 48)  # phase 2's prompt lengths (inclusive)
SCORE_LABELS = (1, 2, 3)  # token counts of the ScoreRequest's continuations
# Off CUDA there is no graph to capture and nothing is JIT-compiled: the warm-up only runs each path
# once, kept cheap for the test suite (CPU engines are tiny checkpoints).
OFF_CUDA_FAN_OUT = 4


@dataclass(frozen=True)
class WarmupReport:
    seconds: float
    long_prompt_tokens: int
    requests: int
    failed: int  # ended with an error, the ones canceled on a timeout included
    timed_out: bool
    cache_reset: bool  # False: some block was still held, or the reset had not run when we returned
    blocks_free_before: int
    blocks_free_after: int | None  # None when the reset had not run when we returned
    prefill_compile_calls: int = 0  # compile_prefill's calls (flash-attn-4 kernel variants)


def max_new_tokens(row: int, buckets: list[int]) -> int:
    """Row r stays in the decode batch while fewer than b rows precede it, for each bucket b."""
    return 1 + 2 * sum(b > row for b in buckets)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)


def long_prompt_tokens(engine: ServingEngine, fan_out: int, cap: int) -> int:
    """The document's length: at most cap, fits the context after its longest continuation, and
    leaves the pool room for every continuation's own blocks (the document's partial last block,
    the suffix and the output)."""
    bs = engine.config.block_size
    tail = SUFFIX_TOKENS + max_new_tokens(0, buckets_for(fan_out))
    pool = engine.scheduler.num_blocks * bs
    room = (fan_out + len(SCORE_LABELS)) * blocks_for(bs + tail, bs) * bs
    # a pool too small for all of them at once: half of it, the scheduler preempts and recomputes the rest
    return max(1, min(cap, engine.max_model_len - tail, max(pool - room, pool // 2)))


def build_phases(engine: ServingEngine, *, fan_out: int, long_tokens: int,
                 seed: int = 0) -> list[list[GenerateRequest | ScoreRequest]]:
    """The two phases' requests, token ids drawn from the vocabulary by a seeded RNG."""
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    buckets = buckets_for(fan_out)
    doc = ids(long_tokens)
    document: list[GenerateRequest | ScoreRequest] = [
        GenerateRequest(prompt_ids=doc + ids(SUFFIX_TOKENS), params=_greedy(max_new_tokens(r, buckets)))
        for r in range(fan_out)]
    document.append(ScoreRequest(prefix_ids=doc + ids(SUFFIX_TOKENS), continuations=[ids(k) for k in SCORE_LABELS]))
    room = max(1, engine.max_model_len - max_new_tokens(0, buckets))
    short: list[GenerateRequest | ScoreRequest] = [
        GenerateRequest(prompt_ids=ids(min(room, rng.randint(*SHORT_TOKENS))), params=_greedy(max_new_tokens(r, buckets)))
        for r in range(fan_out)]
    return [document, short]


def _wait(engine: ServingEngine, futures: list[Future], deadline: float) -> bool:
    """Whether every future ended before the deadline (an engine without a thread is stepped here,
    to the end: the deadline bounds only a threaded engine)."""
    if not engine.threaded:
        engine.run_until_idle()
        return True
    _, pending = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    return not pending


def compile_prefill(engine: ServingEngine) -> int:
    """The prefill backend's per-call JIT kernels compiled ahead (flash-attn-4's head-group and window
    variants: which ones a document needs follows its activations, so random ids alone miss some).
    Returns the calls made; 0 for a backend without them, or (with a warning) when compiling fails."""
    compile_fn = getattr(engine.model.backend, "compile_prefill", None)
    if compile_fn is None:
        return 0
    import torch

    cfg = engine.model.config
    try:
        with torch.inference_mode():
            return int(compile_fn(engine.model.slopes, scale=cfg.scale, head_dim=cfg.head_dim, dtype=engine.model.dtype))
    except Exception as exc:  # noqa: BLE001 - a warm-up never fails the load: the kernels compile at first use
        log.warning("engine warm-up: compiling the prefill kernels ahead failed (%s); they compile at first use", exc)
        return 0


def warm_up(engine: ServingEngine, *, timeout_s: float = WARMUP_TIMEOUT_S, fan_out: int | None = None,
            long_tokens: int | None = None, seed: int = 0) -> WarmupReport:
    """Run the synthetic requests through the engine and wait for them (at most timeout_s: past it
    the rest is canceled and a warning logged; the engine stays usable). Call it before any real
    request is submitted: the prefix-cache reset at the end needs every block unheld. long_tokens caps
    the document (default: the context on CUDA); fan_out is the decode batch it starts from (default:
    max_num_seqs on CUDA)."""
    start = time.monotonic()
    deadline = start + timeout_s
    on_cuda = engine.device.type == "cuda"
    fan_out = fan_out or (engine.config.max_num_seqs if on_cuda else min(OFF_CUDA_FAN_OUT, engine.config.max_num_seqs))
    if long_tokens is None:  # off CUDA: the shortest document whose continuations still form a prefix group
        long_tokens = engine.max_model_len if on_cuda else engine.config.min_shared_tokens + engine.config.block_size
    n_long = long_prompt_tokens(engine, fan_out, long_tokens)
    compiled = compile_prefill(engine)  # while the engine is idle: nothing else uses the device yet
    free_before = engine.stats()["blocks_free"]
    submitted: list[tuple[str, Future]] = []
    timed_out = False
    for phase in build_phases(engine, fan_out=fan_out, long_tokens=n_long, seed=seed):
        futures = [engine.submit(r) for r in phase]
        submitted += [(r.request_id, f) for r, f in zip(phase, futures, strict=True)]
        if not _wait(engine, futures, deadline):
            timed_out = True
            break
    if timed_out:
        for rid, future in submitted:
            if not future.done():
                engine.cancel(rid)
        log.warning("engine warm-up: not done after %.0f s; the rest is canceled, and the first real requests "
                    "may pay for kernel compiles and graph captures", timeout_s)
    reset = engine.reset_prefix_cache()  # behind the cancels in the inbox, ahead of any real request
    if not engine.threaded:
        engine.run_until_idle()
    grace = RESET_GRACE_S if timed_out else max(RESET_GRACE_S, deadline - time.monotonic())
    wait([reset], timeout=grace)
    cache_reset = reset.done() and reset.result()
    errors = [f.exception() for _, f in submitted if f.done() and f.exception() is not None]
    if errors and not timed_out:  # the same fault would meet real work: say so at load
        log.warning("engine warm-up: %d of %d requests failed, first: %s", len(errors), len(submitted), errors[0])
    free_after = engine.stats()["blocks_free"] if reset.done() else None
    if not reset.done():
        log.warning("engine warm-up: the prefix-cache reset waits behind a running step; it runs before the "
                    "first real request")
    elif not cache_reset or free_after != free_before:
        log.warning("engine warm-up left blocks held: %s free, %d before (prefix cache reset: %s)",
                    free_after, free_before, cache_reset)
    report = WarmupReport(time.monotonic() - start, n_long, len(submitted), len(errors), timed_out, cache_reset,
                          free_before, free_after, compiled)
    log.info("engine warm-up: %d requests (a %d-token document with %d continuations and a score request, "
             "%d short prompts; decode batches down from %d) in %.1f s", report.requests, n_long, fan_out,
             fan_out, fan_out, report.seconds)
    return report
