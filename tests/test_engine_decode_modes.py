"""How the decode step runs: mode selection, and the CUDA-graph step's bookkeeping (static input
buffers, a static logits output the next step overwrites) run eagerly on CPU. The capture itself
needs a GPU: bench/engine.py's decode stage compares graph and eager tokens there."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.engine import DenseGenerator, SamplingParams, prefill_chunked
from pipeline.engine import generate as generate_module
from pipeline.engine.generate import resolve_decode_mode
from pipeline.engine.graphs import CudaGraphStep, StaticDecodeStep
from tests.fixtures_engine import ENGINE_PROMPTS

pytestmark = pytest.mark.usefixtures("engine_single_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("requested", "device", "backend", "expected"),
    [
        (None, CPU, "blockwise", "eager"),
        (None, CUDA, "sdpa", "graph"),
        (None, CUDA, "splitk", "graph"),
        (None, CUDA, None, "graph"),
        ("eager", CUDA, "sdpa", "eager"),
        ("compile", CUDA, "sdpa", "compile"),
        ("compile", CPU, "blockwise", "compile"),
        ("graph", CUDA, "sdpa", "graph"),
    ],
)
def test_decode_mode_selection(requested, device, backend, expected):
    assert resolve_decode_mode(requested, device, backend) == expected


def test_default_on_cuda_with_a_host_syncing_decode_kernel_is_eager_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.engine.generate"):
        assert resolve_decode_mode(None, CUDA, "blockwise") == "eager"
    assert "blockwise syncs with the host" in caplog.text


@pytest.mark.parametrize(
    ("requested", "device", "backend", "message"),
    [
        ("graph", CPU, "blockwise", "needs a CUDA model"),
        ("graph", CUDA, "blockwise", "cannot capture the blockwise decode kernel"),
        ("cuda-graph", CUDA, "sdpa", "must be one of"),
    ],
)
def test_a_graph_that_cannot_run_is_refused(requested, device, backend, message):
    with pytest.raises(ValueError, match=message):
        resolve_decode_mode(requested, device, backend)


def test_generator_on_cpu_defaults_to_eager_and_refuses_graph(tiny_model):
    model, tok = tiny_model
    assert DenseGenerator(model, tok).decode_mode == "eager"
    with pytest.raises(ValueError, match="needs a CUDA model"):
        DenseGenerator(model, tok, decode_mode="graph")
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        CudaGraphStep(model, model.new_cache(1, 8))


def test_cache_is_sized_exactly_except_for_the_compiled_step(tiny_model):
    model, tok = tiny_model
    assert DenseGenerator(model, tok).new_cache(2, 4100).max_len == 4100
    assert DenseGenerator(model, tok, decode_mode="compile").new_cache(1, 4100).max_len == 5120


def _prefilled(model, prompts, extra):
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + extra)
    logits = torch.stack([prefill_chunked(model, p, cache, row=r) for r, p in enumerate(prompts)])  # [B, V]
    return cache, logits


def test_static_step_equals_eager_decode_and_reuses_its_output_buffer(tiny_model):
    model, tok = tiny_model
    prompts = [tok.encode(p) for p in ENGINE_PROMPTS]  # three rows at three lengths
    steps = 12
    eager_cache, logits = _prefilled(model, prompts, steps)
    static_cache, _ = _prefilled(model, prompts, steps)
    step = StaticDecodeStep(model, static_cache)
    tokens = logits.argmax(-1)  # [B]
    positions = torch.tensor([len(p) for p in prompts])
    outputs = []
    for _ in range(steps):
        with torch.inference_mode():
            expected = model.decode(tokens, eager_cache, positions)
        got = step(tokens, positions)
        outputs.append(got)
        assert torch.equal(got, expected)
        tokens, positions = got.argmax(-1), positions + 1  # taken before the next call overwrites it
    assert all(o is outputs[0] for o in outputs)  # one static output, like a graph's
    assert torch.equal(static_cache.k, eager_cache.k) and torch.equal(static_cache.v, eager_cache.v)
    with pytest.raises(ValueError, match="for batch 3"):
        step(tokens[:2], positions[:2])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=14, greedy=True, stop_at_eos=False),
        SamplingParams(max_new_tokens=14, temperature=1.3, top_p=0.9, seed=3, stop_at_eos=False),
    ],
)
def test_generator_graph_path_gives_the_eager_tokens(tiny_model, monkeypatch, params):
    """The DenseGenerator's "graph" branch end to end, with the capture swapped for an eager run on the
    same static buffers (the only part that needs CUDA)."""
    model, tok = tiny_model
    made: list[StaticDecodeStep] = []

    def static_step(model, cache, *, pick=None, capture_pick=False):
        made.append(StaticDecodeStep(model, cache, pick=pick))
        return made[-1]

    monkeypatch.setattr(generate_module, "CudaGraphStep", static_step)
    eager = DenseGenerator(model, tok, decode_mode="eager")
    graph = DenseGenerator(model, tok, decode_mode="eager")
    graph.decode_mode = "graph"  # what resolve_decode_mode picks on CUDA
    prompts = [tok.encode(p) for p in ENGINE_PROMPTS]
    expected = eager.generate_ids(prompts, params)
    got = graph.generate_ids(prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in expected]
    assert len(got[0].tokens) == params.max_new_tokens
    shared = graph.generate_from_prefix(prompts[2], prompts[:2], params)
    assert [c.tokens for c in shared] == [c.tokens for c in eager.generate_from_prefix(prompts[2], prompts[:2], params)]
    # one step (one capture) per generate call, each over a cache of exactly prompt + new tokens
    assert [s.cache.max_len for s in made] == [
        max(map(len, prompts)) + params.max_new_tokens,
        len(prompts[2]) + max(map(len, prompts[:2])) + params.max_new_tokens,
    ]
