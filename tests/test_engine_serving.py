"""The serving engine against each request run alone from scratch (the dense Generator): paged KV
blocks, shared document prefixes, continuous batching, chunked prefill, preemption, cancellation,
scoring. Tiny random checkpoint on CPU, float32."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.engine.core.requests import EngineError, GenerateRequest, SamplingParams, ScoreRequest
from pipeline.engine.paged_cache import bytes_per_token
from pipeline.engine.score import score
from pipeline.engine.serving import EngineConfig, ServingEngine

pytestmark = pytest.mark.usefixtures("engine_single_thread")

BLOCK = 16


def make_engine(model, tokenizer, *, blocks: int = 256, **overrides) -> ServingEngine:
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=blocks * BLOCK * bytes_per_token(model.config, model.dtype),
                       max_num_batched_tokens=overrides.pop("budget", 96), max_prefill_chunk=overrides.pop("chunk", 40),
                       min_shared_tokens=overrides.pop("min_shared", BLOCK), **overrides)
    return ServingEngine(model, tokenizer, cfg, start_thread=False)


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def alone(tiny_generator, prompt: list[int], params: SamplingParams) -> list[int]:
    return tiny_generator.generate_ids([prompt], params)[0].tokens


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_docs=st.integers(1, 3), tasks=st.integers(1, 4))
@pytest.mark.parametrize("batch_prefills", [False, True])
def test_shared_prefix_continuous_batching_equals_each_request_alone(tiny_model, tiny_generator, batch_prefills, seed,
                                                                      n_docs, tasks):
    model, tokenizer = tiny_model
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    requests = []
    for _ in range(n_docs):
        doc = random_ids(rng, rng.randrange(20, 120), vocab)
        for _ in range(tasks):
            requests.append((doc + random_ids(rng, rng.randrange(1, 12), vocab), greedy(rng.randrange(1, 10))))
    rng.shuffle(requests)
    engine = make_engine(model, tokenizer, blocks=rng.choice([24, 64, 256]),  # 24 blocks force preemption
                         batch_prefills=batch_prefills)
    futures = []
    for prompt, params in requests:  # arrivals interleaved with steps: continuous batching
        futures.append(engine.submit(GenerateRequest(prompt_ids=prompt, params=params)))
        engine._drain_inbox()
        for _ in range(rng.randrange(0, 3)):
            if engine.scheduler.has_work():
                engine.step()
    engine.run_until_idle()
    for (prompt, params), fut in zip(requests, futures, strict=True):
        assert fut.result().tokens == alone(tiny_generator, prompt, params)
    stats = engine.stats()
    assert stats["blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


def test_tasks_on_one_document_prefill_it_once_and_a_rerun_hits_the_cache(tiny_model, tiny_generator):
    model, tokenizer = tiny_model
    rng = random.Random(3)
    doc = random_ids(rng, 200, model.config.vocab_size)
    suffixes = [random_ids(rng, 5, model.config.vocab_size) for _ in range(4)]
    engine = make_engine(model, tokenizer, budget=512, chunk=512)
    futures = [engine.submit(GenerateRequest(prompt_ids=doc + s, params=greedy(6))) for s in suffixes]
    engine.run_until_idle()
    results = [f.result() for f in futures]
    full_blocks = len(doc) // BLOCK * BLOCK
    assert sorted(r.cached_tokens for r in results) == [0, full_blocks, full_blocks, full_blocks]
    for s, r in zip(suffixes, results, strict=True):
        assert r.tokens == alone(tiny_generator, doc + s, greedy(6))
    later = engine.submit(GenerateRequest(prompt_ids=doc + suffixes[0], params=greedy(6)))
    engine.run_until_idle()
    assert later.result().cached_tokens >= full_blocks
    assert engine.stats()["prefix_hit_tokens"] >= 4 * full_blocks


def test_decode_rows_sharing_a_document_run_as_one_group(tiny_model, tiny_generator, monkeypatch):
    model, tokenizer = tiny_model
    rng = random.Random(5)
    doc = random_ids(rng, 96, model.config.vocab_size)
    prompts = [doc + random_ids(rng, 3, model.config.vocab_size) for _ in range(3)]
    engine = make_engine(model, tokenizer, budget=512, chunk=512)
    seen_groups = []
    launch = engine.runner.launch

    def spy(out, sampling):
        seen_groups.extend(out.prefix_groups)
        return launch(out, sampling)

    monkeypatch.setattr(engine.runner, "launch", spy)
    futures = [engine.submit(GenerateRequest(prompt_ids=p, params=greedy(8))) for p in prompts]
    engine.run_until_idle()
    assert any(len(g.seq_ids) == 3 and g.num_tokens == len(doc) // BLOCK * BLOCK for g in seen_groups)
    for p, f in zip(prompts, futures, strict=True):
        assert f.result().tokens == alone(tiny_generator, p, greedy(8))


def test_scores_equal_the_dense_reference_and_share_the_prefix(tiny_model):
    model, tokenizer = tiny_model
    rng = random.Random(7)
    prefix = random_ids(rng, 70, model.config.vocab_size)
    conts = [random_ids(rng, n, model.config.vocab_size) for n in (1, 3, 6)]
    engine = make_engine(model, tokenizer)
    fut = engine.submit(ScoreRequest(prefix_ids=prefix, continuations=conts))
    engine.run_until_idle()
    got = fut.result()
    want = score(model, prefix, conts)
    assert got.logprobs == pytest.approx(want, abs=1e-4)
    assert [len(t) for t in got.token_logprobs] == [1, 3, 6]
    assert got.cached_tokens > 0  # the continuations after the first found the prefix's blocks


@pytest.mark.parametrize("batch_prefills", [False, True])
def test_scores_survive_preemption_in_a_tiny_pool(tiny_model, batch_prefills):
    model, tokenizer = tiny_model
    rng = random.Random(8)
    engine = make_engine(model, tokenizer, blocks=7, budget=64, chunk=16, batch_prefills=batch_prefills)
    cases = []
    for _ in range(6):
        prefix = random_ids(rng, rng.randrange(50, 90), model.config.vocab_size)
        conts = [random_ids(rng, rng.randrange(1, 8), model.config.vocab_size) for _ in range(3)]
        cases.append((prefix, conts, engine.submit(ScoreRequest(prefix_ids=prefix, continuations=conts))))
    engine.run_until_idle()
    assert engine.stats()["preemptions"] > 0
    for prefix, conts, fut in cases:
        assert fut.result().logprobs == pytest.approx(score(model, prefix, conts), abs=1e-4)


def test_cancel_too_long_and_bad_requests_end_with_codes(tiny_model, tiny_generator):
    model, tokenizer = tiny_model
    rng = random.Random(9)
    engine = make_engine(model, tokenizer)
    keep = random_ids(rng, 30, model.config.vocab_size)
    victim = engine.submit(GenerateRequest(prompt_ids=random_ids(rng, 30, model.config.vocab_size),
                                           params=greedy(50), request_id="victim"))
    other = engine.submit(GenerateRequest(prompt_ids=keep, params=greedy(12)))
    huge = engine.submit(GenerateRequest(prompt_ids=[1] * model.config.max_seq_len, params=greedy(1)))
    empty = engine.submit(GenerateRequest(prompt_ids=[], params=greedy(1)))
    engine._drain_inbox()
    for _ in range(3):
        engine.step()
    engine.cancel("victim")
    engine.run_until_idle()
    for fut, code in ((victim, "canceled"), (huge, "too_long"), (empty, "invalid_request")):
        with pytest.raises(EngineError) as err:
            fut.result()
        assert err.value.code == code
    assert other.result().tokens == alone(tiny_generator, keep, greedy(12))
    assert engine.stats()["blocks_used"] == 0


def test_no_block_leaks_after_many_requests_in_a_tiny_pool(tiny_model):
    model, tokenizer = tiny_model
    rng = random.Random(11)
    engine = make_engine(model, tokenizer, blocks=12, budget=64, chunk=32)
    futures, ids = [], []
    for i in range(300):
        prompt = random_ids(rng, rng.randrange(1, 40), model.config.vocab_size)
        req = GenerateRequest(prompt_ids=prompt, params=greedy(rng.randrange(1, 4)))
        futures.append(engine.submit(req))
        ids.append(req.request_id)
        if i % 7 == 0:
            engine.cancel(rng.choice(ids))
        if i % 20 == 0:
            engine.run_until_idle()
    engine.run_until_idle()
    assert all(f.done() for f in futures)
    stats = engine.stats()
    assert stats["blocks_used"] == 0 and stats["blocks_free"] == 12


def test_engine_thread_serves_concurrent_submitters(tiny_model, tiny_generator):
    model, tokenizer = tiny_model
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=128 * BLOCK * bytes_per_token(model.config, model.dtype))
    engine = ServingEngine(model, tokenizer, cfg)
    try:
        rng = random.Random(13)
        prompts = [random_ids(rng, 25, model.config.vocab_size) for _ in range(6)]
        results: dict[int, list[int]] = {}
        streamed: dict[int, list[int]] = {i: [] for i in range(6)}

        def client(i: int) -> None:
            req = GenerateRequest(prompt_ids=prompts[i], params=greedy(5), on_token=streamed[i].append)
            results[i] = engine.submit(req).result(timeout=60).tokens

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, p in enumerate(prompts):
            assert results[i] == alone(tiny_generator, p, greedy(5)) == streamed[i]
    finally:
        engine.shutdown()
    with pytest.raises(EngineError):
        engine.submit(GenerateRequest(prompt_ids=[1, 2], params=greedy(1))).result(timeout=5)


def test_seeded_sampling_does_not_depend_on_batch_company(tiny_model):
    model, tokenizer = tiny_model
    params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=42, stop_at_eos=False)
    prompt = [5, 6, 7, 8]

    def run(extra: int) -> list[int]:
        engine = make_engine(model, tokenizer)
        fut = engine.submit(GenerateRequest(prompt_ids=prompt, params=params))
        for i in range(extra):
            engine.submit(GenerateRequest(prompt_ids=[9 + i, 3], params=SamplingParams(max_new_tokens=8, seed=i)))
        engine.run_until_idle()
        return fut.result().tokens

    assert run(0) == run(3)
    assert torch.get_num_threads() == 1


def test_generator_facade_runs_through_the_engine(tiny_model, tiny_generator):
    from pipeline.engine import Generator

    model, tokenizer = tiny_model
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=64 * BLOCK * bytes_per_token(model.config, model.dtype))
    facade = Generator(model, tokenizer, cfg)
    prefix, suffixes = [3, 4, 5, 6] * 10, [[7], [8, 9]]
    got = facade.generate_from_prefix(prefix, suffixes, greedy(5))
    assert [c.tokens for c in got] == [alone(tiny_generator, prefix + s, greedy(5)) for s in suffixes]
    assert facade.score(prefix, [[7, 8]]) == pytest.approx(score(model, prefix, [[7, 8]]), abs=1e-4)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        facade.generate_ids([[1] * model.config.max_seq_len], greedy(1))


def test_stop_token_ids_end_a_sequence_like_end_of_text(tiny_model, tiny_generator):
    model, tokenizer = tiny_model
    prompt = [11, 12, 13, 14]
    free = alone(tiny_generator, prompt, greedy(12))
    stop_at = free[5]
    first = free.index(stop_at)
    engine = make_engine(model, tokenizer)
    fut = engine.submit(GenerateRequest(prompt_ids=prompt, params=SamplingParams(
        max_new_tokens=12, greedy=True, stop_at_eos=False, stop_token_ids=(stop_at,))))
    engine.run_until_idle()
    result = fut.result()
    assert result.finish_reason == "stop" and result.tokens == free[:first]
    assert result.text == tokenizer.decode(free[:first])


def test_engine_thread_keeps_the_gil_switch_interval_off_cuda_and_counts_host_time(tiny_model):
    """gil_switch_interval_s takes effect when the engine thread starts on CUDA and not elsewhere; stats
    split the step's wall time into queuing work on the device and waiting for its results (both
    inside busy)."""
    import sys

    model, tokenizer = tiny_model
    before = sys.getswitchinterval()
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=64 * BLOCK * bytes_per_token(model.config, model.dtype),
                       gil_switch_interval_s=before / 7)
    engine = ServingEngine(model, tokenizer, cfg)
    try:
        assert sys.getswitchinterval() == before  # a CPU engine leaves the interpreter as it was
        engine.submit(GenerateRequest(prompt_ids=list(range(1, 30)), params=greedy(6))).result(timeout=60)
        stats = engine.stats()
        assert stats["launch_ms"] + stats["wait_ms"] <= stats["busy_ms"] + 1
        assert stats["launch_ms"] > 0  # six launches of a real forward each
    finally:
        engine.shutdown()
        sys.setswitchinterval(before)


def test_a_steps_prefill_chunks_as_one_forward_give_what_each_gives_alone(tiny_model, tiny_generator):
    """batch_prefills: a document's task tails, label continuations and another document's chunk in
    one forward per step (counted) give the tokens and scores of each request run alone."""
    model, tokenizer = tiny_model
    rng = random.Random(21)
    vocab = model.config.vocab_size
    doc, other = random_ids(rng, 100, vocab), random_ids(rng, 70, vocab)
    tails = [doc + random_ids(rng, rng.randrange(2, 9), vocab) for _ in range(4)] + [other]
    labels = [random_ids(rng, n, vocab) for n in (1, 2, 4)]
    engine = make_engine(model, tokenizer, budget=512, chunk=512, batch_prefills=True)
    forwards, steps_with_many = [], 0
    segments = model.prefill_segments

    def count(tokens, cache, metas, rows):
        forwards.append(len(metas))
        return segments(tokens, cache, metas, rows)

    model.prefill_segments = count
    try:
        first = engine.submit(GenerateRequest(prompt_ids=doc + [1, 2], params=greedy(3)))
        engine.run_until_idle()  # the document's blocks are cached: the rest prefill only their tails
        gens = [engine.submit(GenerateRequest(prompt_ids=p, params=greedy(5))) for p in tails]
        scores = engine.submit(ScoreRequest(prefix_ids=doc, continuations=labels))
        engine.run_until_idle()
    finally:
        del model.prefill_segments
    steps_with_many = sum(n > 1 for n in forwards)
    assert steps_with_many >= 1 and max(forwards) >= 5  # tails, labels and the other document together
    assert first.result().tokens == alone(tiny_generator, doc + [1, 2], greedy(3))
    for p, f in zip(tails, gens, strict=True):
        assert f.result().tokens == alone(tiny_generator, p, greedy(5))
    assert scores.result().logprobs == pytest.approx(score(model, doc, labels), abs=1e-4)


def test_step_trace_records_every_step_and_its_prefill_tokens(tiny_model):
    """The trace (bench/tasks_mpt.py's breakdown) sees each launched step once: its prefill chunks add
    up to the prompt tokens computed, its decode rows to the tokens generated after each first one."""
    from pipeline.engine.step_trace import LONG_CHUNK_TOKENS, StepTrace

    model, tokenizer = tiny_model
    rng = random.Random(5)
    engine = make_engine(model, tokenizer, budget=96, chunk=40)
    engine.trace = StepTrace()
    prompts = [random_ids(rng, n, model.config.vocab_size) for n in (70, 9)]
    futures = [engine.submit(GenerateRequest(prompt_ids=p, params=greedy(5))) for p in prompts]
    engine.run_until_idle()
    for f in futures:
        f.result()
    steps = engine.trace.steps
    assert len(steps) == engine.stats()["steps"]
    assert sum(sum(s.prefill_chunks) for s in steps) == sum(map(len, prompts))
    assert sum(s.decode_rows for s in steps) == 2 * 4  # 5 tokens each, the first from the prompt's step
    assert all(max(s.prefill_chunks, default=0) <= 40 for s in steps)
    summary = engine.trace.summary()
    kinds = summary["kinds"]
    assert "long_prefill" not in kinds and LONG_CHUNK_TOKENS > 40
    assert sum(k["steps"] for k in kinds.values()) == len(steps)
    assert sum(k["prefill_tokens"] for k in kinds.values()) == sum(map(len, prompts))
    assert abs(sum(k["wall_s"] for k in kinds.values()) - summary["span_s"]) < 1e-2
    by_rows = summary["decode_by_rows"]
    assert sum(b["steps"] for b in by_rows.values()) == kinds["decode"]["steps"]
    assert set(by_rows) <= {"<=1", "<=4"}  # two sequences at most decode at once
