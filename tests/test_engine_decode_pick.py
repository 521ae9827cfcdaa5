"""The serving decode step picks greedily inside itself (inside its CUDA graph on CUDA; the CPU runs
the same function): the token, its log p and the hand-over of the sampled tokens to the next step's
placeholder rows. Greedy rows must get what the outside sampler gives them, seeded rows in the same
batch still sample outside from the logits the step keeps, and every step's hand-over must carry
the token each row really got (a greedy pick, a seeded sample or a prompt's first token)."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.engine.core.requests import GenerateRequest, SamplingParams
from pipeline.engine.paged_cache import bytes_per_token
from pipeline.engine.score import score
from pipeline.engine.serving import EngineConfig, ServingEngine

pytestmark = pytest.mark.usefixtures("engine_single_thread")

BLOCK = 16


def make_engine(model, tokenizer, *, async_scheduling: bool = True) -> ServingEngine:
    cfg = EngineConfig(block_size=BLOCK, kv_cache_bytes=128 * BLOCK * bytes_per_token(model.config, model.dtype),
                       max_num_batched_tokens=64, max_prefill_chunk=32, min_shared_tokens=BLOCK,
                       async_scheduling=async_scheduling)
    return ServingEngine(model, tokenizer, cfg, start_thread=False)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)


def seeded(n: int, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, seed=seed, stop_at_eos=False)


class DecodeSpy:
    """Checks each decode step's own picks against the outside sampler on the logits it returned, and
    counts steps whose tokens all came from the step's own hand-over (greedy decode rows only)."""

    def __init__(self, engine: ServingEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = self.in_step_only = self.checked_rows = 0
        runner = engine.runner
        decode, launch = runner._decode, runner.launch

        def spy_decode(decodes, groups):
            logits, logp, picks = decode(decodes, groups)
            outside = torch.log_softmax(logits.clone(), dim=-1)
            tokens = logits.argmax(dim=-1)
            assert torch.equal(picks[:, 0].long(), tokens)
            assert torch.equal(picks[:, 1], outside.gather(-1, tokens[:, None])[:, 0].double())
            assert torch.equal(logp, outside)
            self.checked_rows += len(decodes)
            return logits, logp, picks

        def spy_launch(out, sampling):
            self.steps += 1
            rows = [d.seq.seq_id for d in out.decodes]
            self.in_step_only += bool(rows) and not out.prefills and all(sampling[r].params.is_greedy for r in rows)
            return launch(out, sampling)

        monkeypatch.setattr(runner, "_decode", spy_decode)
        monkeypatch.setattr(runner, "launch", spy_launch)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_in_step_greedy_pick_and_hand_over_in_mixed_greedy_and_seeded_batches(
        tiny_model, tiny_generator, monkeypatch, async_scheduling):
    model, tokenizer = tiny_model
    rng = random.Random(31)
    vocab = model.config.vocab_size
    work = []  # (prompt, params, arrives after this many steps): seeded rows join and leave greedy ones
    for i in range(6):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randrange(5, 40))]
        params = greedy(rng.randrange(6, 14)) if i % 2 == 0 else seeded(rng.randrange(3, 10), seed=100 + i)
        work.append((prompt, params, 0 if i < 2 else rng.randrange(1, 10)))
    engine = make_engine(model, tokenizer, async_scheduling=async_scheduling)
    spy = DecodeSpy(engine, monkeypatch)
    futures = {}
    for step in range(12):
        for i, (prompt, params, at) in enumerate(work):
            if at == step:
                futures[i] = engine.submit(GenerateRequest(prompt_ids=prompt, params=params))
        engine._drain_inbox()
        if engine.has_work():
            engine.step()
    engine.run_until_idle()
    assert spy.checked_rows > 0 and 0 < spy.in_step_only < spy.steps  # both kinds of step ran
    assert len(futures) == len(work)
    for i, (prompt, params, _) in enumerate(work):
        got = futures[i].result()
        assert len(got.tokens) == params.max_new_tokens == len(got.logprobs)
        if params.is_greedy:
            assert got.tokens == tiny_generator.generate_ids([prompt], params)[0].tokens
        else:  # a seeded sample depends on its seed only: the same request alone gets the same tokens
            lone = make_engine(model, tokenizer, async_scheduling=async_scheduling)
            ref = lone.submit(GenerateRequest(prompt_ids=prompt, params=params))
            lone.run_until_idle()
            assert got.tokens == ref.result().tokens
            assert got.logprobs == pytest.approx(ref.result().logprobs, abs=1e-5)
        # each reported log p is the model's for the token the row got (the hand-over fed it back)
        assert sum(got.logprobs) == pytest.approx(score(model, prompt, [got.tokens])[0], abs=1e-3)
