"""The serving engine's warm-up at load (pipeline/engine/warmup.py): it runs every decode bucket and the
scoring path, leaves the pool as a fresh engine's, changes no later result, gives up on time, and
load_engine runs it when the setting says so. Tiny random checkpoint on CPU, float32."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest

from pipeline.engine.core.block_pool import BlockPool
from pipeline.engine.core.requests import GenerateRequest, SamplingParams
from pipeline.engine.paged_cache import bytes_per_token
from pipeline.engine.runner import buckets_for
from pipeline.engine.serving import EngineConfig, ServingEngine
from pipeline.engine.warmup import warm_up

pytestmark = pytest.mark.usefixtures("engine_single_thread")

BLOCK = 16


def make_engine(model, tokenizer, *, start_thread: bool = False, **overrides) -> ServingEngine:
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=4096 * BLOCK * bytes_per_token(model.config, model.dtype),
                       min_shared_tokens=BLOCK, **overrides)
    return ServingEngine(model, tokenizer, cfg, start_thread=start_thread)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)


def test_warm_up_runs_every_decode_bucket_and_leaves_the_pool_as_a_fresh_one(tiny_model):
    model, tokenizer = tiny_model
    engine = make_engine(model, tokenizer, max_num_seqs=16)
    free = engine.stats()["blocks_free"]
    report = warm_up(engine, fan_out=16)
    assert not report.timed_out and report.failed == 0 and report.cache_reset
    assert report.requests == 2 * 16 + 1  # the document's continuations, its score request, the short prompts
    assert report.blocks_free_before == report.blocks_free_after == free == engine.scheduler.num_blocks
    stats = engine.stats()
    assert stats["blocks_cached"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert engine.scheduler.kv.pool.num_cached == 0
    assert stats["prefix_hit_tokens"] > 0  # the continuations found the document's blocks
    # off CUDA the runner keys its decode buffers by the exact batch: the batches went through every
    # bucket, plain and (from two rows up) with a prefix group, as on CUDA they would capture each graph
    buckets = buckets_for(16)
    for cascade, want in ((False, buckets), (True, buckets[1:])):
        seen = {next(b for b in buckets if b >= batch) for batch, c, _skip in engine.runner._inputs if c == cascade}
        assert seen == set(want), (cascade, sorted(engine.runner._inputs))


def test_a_request_after_warm_up_gives_what_a_fresh_engine_gives(tiny_model):
    model, tokenizer = tiny_model
    rng = random.Random(7)
    doc = [rng.randrange(1, model.config.vocab_size) for _ in range(90)]
    requests = [(doc + [rng.randrange(1, model.config.vocab_size) for _ in range(5)], greedy(n)) for n in (6, 9)]
    results = []
    for warm in (True, False):
        engine = make_engine(model, tokenizer, start_thread=True)
        try:
            if warm:
                t0 = time.perf_counter()
                warm_up(engine)
                logging.getLogger(__name__).info("warm-up on the tiny model: %.2f s", time.perf_counter() - t0)
            futures = [engine.submit(GenerateRequest(prompt_ids=p, params=s)) for p, s in requests]
            results.append([f.result(timeout=60) for f in futures])
        finally:
            engine.shutdown()
    warmed, fresh = results
    assert [r.tokens for r in warmed] == [r.tokens for r in fresh]
    assert [r.logprobs for r in warmed] == [r.logprobs for r in fresh]
    assert [r.cached_tokens for r in warmed] == [r.cached_tokens for r in fresh]  # nothing hit from the warm-up


def test_a_warm_up_out_of_time_cancels_the_rest_and_the_engine_serves_on(tiny_model, caplog):
    model, tokenizer = tiny_model
    engine = make_engine(model, tokenizer, start_thread=True)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.engine.warmup"):
            report = warm_up(engine, timeout_s=0.0)
        assert report.timed_out and "not done after" in caplog.text
        prompt = [3, 5, 7, 11, 13, 17]
        assert len(engine.submit(GenerateRequest(prompt_ids=prompt, params=greedy(4))).result(timeout=60).tokens) == 4
        deadline = time.monotonic() + 10
        while engine.stats()["blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["blocks_used"] == 0 and engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_block_pool_reset_prefix_cache_only_when_nothing_is_held():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    assert a == [0, 1, 2]
    for i, b in enumerate(a):
        pool.cache(b, 100 + i)
    assert not pool.reset_prefix_cache() and pool.num_cached == 3  # held: refused, unchanged
    pool.release(reversed(a))
    assert pool.num_evictable == 3
    assert pool.reset_prefix_cache()
    pool.check()
    assert pool.num_cached == 0 and pool.num_free == 8 and pool.lookup(100) is None
    assert pool.allocate(8) == list(range(8))  # handed out as by a fresh pool


@pytest.mark.parametrize("on", [True, False])
def test_load_engine_warms_up_when_the_setting_is_on(tiny_ckpt: Path, monkeypatch, on):
    import pipeline.engine.warmup as warmup
    from pipeline.tasks.mpt.engine import ServingOptions, load_engine

    calls = []
    real = warmup.warm_up
    monkeypatch.setattr(warmup, "warm_up", lambda serving, **kw: calls.append(real(serving, **kw)))
    engine = load_engine(model=str(tiny_ckpt), device="cpu", embedding_model="all-MiniLM-L6-v2",
                         options=ServingOptions(block_size=BLOCK, warmup=on))
    try:
        assert len(calls) == (1 if on else 0)
        if on:
            assert calls[0].cache_reset and calls[0].failed == 0
            assert engine.serving.stats()["blocks_cached"] == 0
    finally:
        engine.shutdown()


def test_the_warmup_setting_reaches_the_serving_options(monkeypatch):
    from config.settings import Settings
    from workers.document_jobs import mpt_options

    assert mpt_options(Settings())["options"].warmup is True
    monkeypatch.setenv("LONGDOC_ENGINE_WARMUP", "false")
    assert mpt_options(Settings())["options"].warmup is False


def test_warm_up_compiles_the_prefill_backend_kernels_first(tiny_model, monkeypatch):
    """A backend that JIT-compiles per call gets its kernels compiled before any synthetic request,
    with the model's slopes, scale, head size and dtype; one whose compile fails only warns."""
    import dataclasses

    model, tokenizer = tiny_model
    engine = make_engine(model, tokenizer, max_num_seqs=4)
    calls = []

    def compile_prefill(slopes, *, scale, head_dim, dtype):
        calls.append((slopes.tolist(), scale, head_dim, dtype, engine.stats()["requests"]))
        return 16

    monkeypatch.setattr(model, "backend", dataclasses.replace(model.backend, compile_prefill=compile_prefill))
    report = warm_up(engine, fan_out=4)
    assert report.prefill_compile_calls == 16 and report.failed == 0
    assert calls == [(model.slopes.tolist(), model.config.scale, model.config.head_dim, model.dtype, 0)]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(model, "backend", dataclasses.replace(model.backend, compile_prefill=broken))
    assert warm_up(make_engine(model, tokenizer, max_num_seqs=4), fan_out=4).prefill_compile_calls == 0


def test_fa4_compiles_one_kernel_per_group_start_and_window_flag(monkeypatch):
    """flash-attn-4's compile key holds the score_mod (a head group's first head) and local vs causal:
    compile_kernels makes one call per grid start, windowed and not, over that group's heads."""
    import torch

    from pipeline.engine.backends import alibi_window, fa4
    from pipeline.engine.config import alibi_slopes

    seen = []
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: object())
    monkeypatch.setattr(fa4, "_resolve", lambda *a, **k: ("fused", 0.5, [], {}))
    monkeypatch.setattr(fa4, "_call", lambda _i, q, k, v, slopes, group, **kw: seen.append(
        (group.start, group.stop, group.window, q.shape[2], slopes.numel(), kw["variant"])))
    slopes = alibi_slopes(32, 16.0)
    assert fa4.compile_kernels(slopes, scale=0.1, head_dim=8, dtype=torch.float32) == 16
    starts = alibi_window.group_starts(32)
    assert starts == list(range(0, 32, alibi_window.GROUP_ALIGN))
    assert [(s, w) for s, _, w, _, _, _ in seen] == [(s, w) for s in starts for w in (None, fa4.COMPILE_WINDOW)]
    assert all(stop - start == heads == n == alibi_window.GROUP_ALIGN for start, stop, _, heads, n, _ in seen)
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: None)
    assert fa4.compile_kernels(slopes, scale=0.1, head_dim=8, dtype=torch.float32) == 0
