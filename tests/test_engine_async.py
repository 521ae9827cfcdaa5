"""Async scheduling in the serving engine: step N + 1 is planned and launched before step N's tokens
are applied (on CPU the launch has run by then, but the order, the placeholders and the on-device
token hand-over are the ones the GPU runs). Each request still gets exactly what it gets run alone
(the dense Generator): tokens, stop strings and ids ending a row one step late, streaming, scores,
under cancels, preemption while a step is in flight, and prefill chunks mixed with decodes."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.engine.core.requests import EngineError, GenerateRequest, SamplingParams, ScoreRequest
from pipeline.engine.paged_cache import bytes_per_token
from pipeline.engine.score import score
from pipeline.engine.serving import EngineConfig, ServingEngine

pytestmark = pytest.mark.usefixtures("engine_single_thread")

BLOCK = 16


def make_engine(model, tokenizer, *, blocks: int = 256, async_scheduling: bool = True, budget: int = 96,
                chunk: int = 40) -> ServingEngine:
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=blocks * BLOCK * bytes_per_token(model.config, model.dtype),
                       max_num_batched_tokens=budget, max_prefill_chunk=chunk, min_shared_tokens=BLOCK,
                       async_scheduling=async_scheduling)
    return ServingEngine(model, tokenizer, cfg, start_thread=False)


class LaunchSpy:
    """Counts what the runner was asked to launch: decode rows per sequence, rows whose token was
    still a placeholder (on the device), and steps mixing prefill chunks with such decodes."""

    def __init__(self, engine: ServingEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decodes: dict[str, int] = {}
        self.placeholder_rows = 0
        self.mixed_steps = 0
        launch = engine.runner.launch

        def spy(out, sampling):
            behind = [d for d in out.decodes if d.start == len(d.seq.token_ids)]
            self.placeholder_rows += len(behind)
            self.mixed_steps += bool(behind and out.prefills)
            for d in out.decodes:
                self.decodes[d.seq.seq_id] = self.decodes.get(d.seq.seq_id, 0) + 1
            return launch(out, sampling)

        monkeypatch.setattr(engine.runner, "launch", spy)


def ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False, **kw)


def alone(tiny_generator, prompt: list[int], params: SamplingParams):
    return tiny_generator.generate_ids([prompt], params)[0]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), blocks=st.sampled_from([20, 64]))
def test_one_step_behind_equals_each_request_alone_and_the_synchronous_engine(
        tiny_model, tiny_generator, monkeypatch, seed, blocks):
    model, tokenizer = tiny_model
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    work = []  # (prompt, params): documents shared by several tasks; some end on a stop id or string
    for _ in range(rng.randrange(1, 4)):
        doc = ids(rng, rng.randrange(20, 100), vocab)
        for _ in range(rng.randrange(1, 4)):
            prompt = doc + ids(rng, rng.randrange(1, 8), vocab)
            free = alone(tiny_generator, prompt, greedy(12)).tokens
            kind = rng.choice(["length", "stop_id", "stop_str"])
            if kind == "stop_id":
                params = greedy(12, stop_token_ids=(free[rng.randrange(len(free))],))
            elif kind == "stop_str" and tokenizer.decode(free[3:5]).strip():
                params = greedy(12, stop=(tokenizer.decode(free[3:5]).strip(),))
            else:
                params = greedy(rng.randrange(1, 12))
            work.append((prompt, params))
    scoring = (ids(rng, 40, vocab), [ids(rng, rng.randrange(1, 5), vocab) for _ in range(2)])
    runs = {}
    for mode in (True, False):
        engine = make_engine(model, tokenizer, blocks=blocks, async_scheduling=mode)
        spy = LaunchSpy(engine, monkeypatch)
        streams: list[list[int]] = [[] for _ in work]
        futures, order = [], random.Random(seed).sample(range(len(work)), len(work))
        for i in order:  # arrivals interleaved with steps: new prompts' chunks join running decodes
            prompt, params = work[i]
            futures.append((i, engine.submit(GenerateRequest(prompt_ids=prompt, params=params,
                                                             on_token=streams[i].append))))
            engine._drain_inbox()
            for _ in range(random.Random(seed + i).randrange(0, 3)):
                if engine.has_work():
                    engine.step()
        score_fut = engine.submit(ScoreRequest(prefix_ids=scoring[0], continuations=scoring[1]))
        engine.run_until_idle()
        results = {i: f.result() for i, f in futures}
        runs[mode] = (results, streams, score_fut.result(), spy)
        stats = engine.stats()
        assert stats["blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    (res_a, streams_a, score_a, spy_a), (res_s, streams_s, _, spy_s) = runs[True], runs[False]
    for i, (prompt, params) in enumerate(work):
        want = alone(tiny_generator, prompt, params)
        got = res_a[i]
        assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
        assert res_s[i].tokens == want.tokens
        assert streams_a[i] == streams_s[i]  # streaming: the same token ids in the same order
        assert got.logprobs == pytest.approx(res_s[i].logprobs, abs=1e-4)
    assert score_a.logprobs == pytest.approx(score(model, *scoring), abs=1e-4)
    assert spy_s.placeholder_rows == 0
    assert spy_a.placeholder_rows > 0 or all(p.max_new_tokens == 1 for _, p in work)


def test_a_stop_ends_a_row_one_step_late_and_max_tokens_wastes_no_step(tiny_model, tiny_generator, monkeypatch):
    model, tokenizer = tiny_model
    rng = random.Random(21)
    vocab = model.config.vocab_size
    stopper, limited = ids(rng, 30, vocab), ids(rng, 30, vocab)
    free = alone(tiny_generator, stopper, greedy(16)).tokens
    stop_params = greedy(16, stop_token_ids=(free[6],))
    want = alone(tiny_generator, stopper, stop_params)
    engine = make_engine(model, tokenizer)
    spy = LaunchSpy(engine, monkeypatch)
    a = engine.submit(GenerateRequest(prompt_ids=stopper, params=stop_params, request_id="stopper"))
    b = engine.submit(GenerateRequest(prompt_ids=limited, params=greedy(9), request_id="limited"))
    engine.run_until_idle()
    assert a.result().tokens == want.tokens and a.result().finish_reason == "stop"
    assert b.result().tokens == alone(tiny_generator, limited, greedy(9)).tokens
    accepted = len(want.tokens) + 1  # the stop id was sampled and read too
    assert spy.decodes["stopper"] == accepted  # one decode more than it kept: computed before it was read
    assert spy.decodes["limited"] == 9 - 1  # its last allowed token was never decoded again
    assert engine.stats()["tokens_out"] == accepted + 9
    assert engine.stats()["blocks_used"] == 0


def test_cancel_and_resubmit_while_a_step_is_in_flight(tiny_model, tiny_generator):
    model, tokenizer = tiny_model
    rng = random.Random(22)
    vocab = model.config.vocab_size
    first, second, other = ids(rng, 30, vocab), ids(rng, 25, vocab), ids(rng, 20, vocab)
    engine = make_engine(model, tokenizer)
    old = engine.submit(GenerateRequest(prompt_ids=first, params=greedy(20), request_id="job"))
    keep = engine.submit(GenerateRequest(prompt_ids=other, params=greedy(10)))
    engine._drain_inbox()
    for _ in range(4):
        engine.step()
    launched = engine._in_flight
    assert launched is not None and "job" in {d.seq.seq_id for d in launched.out.decodes}
    engine.cancel("job")
    new = engine.submit(GenerateRequest(prompt_ids=second, params=greedy(6), request_id="job"))
    engine.run_until_idle()  # the in-flight token of the canceled "job" must not reach the new one
    with pytest.raises(EngineError) as err:
        old.result()
    assert err.value.code == "canceled"
    assert new.result().tokens == alone(tiny_generator, second, greedy(6)).tokens
    assert keep.result().tokens == alone(tiny_generator, other, greedy(10)).tokens
    assert engine.stats()["blocks_used"] == 0


def test_preemption_while_a_step_is_in_flight_recomputes_the_same_tokens(tiny_model, tiny_generator, monkeypatch):
    model, tokenizer = tiny_model
    rng = random.Random(23)
    vocab = model.config.vocab_size
    prompts = [ids(rng, 60, vocab) for _ in range(4)]  # 100 tokens each = 7 blocks; 4 of them need 28 > 12
    engine = make_engine(model, tokenizer, blocks=12)
    in_flight = []
    preempt = engine.scheduler._preempt

    def spy(seq, out):
        in_flight.append(seq.num_placeholders)
        return preempt(seq, out)

    monkeypatch.setattr(engine.scheduler, "_preempt", spy)
    futures = [engine.submit(GenerateRequest(prompt_ids=p, params=greedy(40))) for p in prompts]
    engine.run_until_idle()
    assert any(n > 0 for n in in_flight), in_flight  # a victim's sampled token was still on the device
    for p, f in zip(prompts, futures, strict=True):
        assert f.result().tokens == alone(tiny_generator, p, greedy(40)).tokens
    assert engine.stats()["blocks_used"] == 0
