"""Fused decode kernels (pipeline/engine/fused.py) and the device-side token loop's lag bookkeeping.

The Triton kernels run here through Triton's interpreter (TRITON_INTERPRET=1) when triton is
installed (it is not in the dev extras: a ~290 MB wheel); on the H200 bench/engine.py's decode stage
checks the fused step's greedy tokens against the eager step. The torch fallbacks (CPU) must be the
unfused ops exactly: test_engine_hf / test_engine_reference keep CPU decode token-for-token with HF.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from pipeline.engine import fused
from pipeline.engine.graphs import run_token_loop
from pipeline.engine.model import LayerNorm

pytestmark = pytest.mark.usefixtures("engine_single_thread")


@pytest.fixture
def interpreted_triton(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before triton's first import: it is read then too
    pytest.importorskip("triton")
    fused._triton.cache_clear()  # jit again, now as interpreted functions
    yield
    fused._triton.cache_clear()


@pytest.mark.parametrize("low_precision", [True, False])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_forward_fallback_is_the_unfused_math(low_precision, with_delta):
    norm = LayerNorm(64, eps=1e-5, bias=True, low_precision=low_precision)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, delta = torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    residual, out = norm.add_forward(x, delta if with_delta else None)
    want = x + delta if with_delta else x
    assert torch.equal(residual, want) and torch.equal(out, norm(want))


def test_write_kv_fallback_writes_one_slot_per_row():
    k_cache, v_cache = torch.zeros(2, 6, 3, 4), torch.zeros(2, 6, 3, 4)  # [B, L, H, D]
    qkv = torch.randn(2, 1, 3 * 12)
    k = qkv[..., 12:24].reshape(2, 1, 3, 4)[:, 0]  # [B, H, D] strided view, as Attention.project makes
    v = qkv[..., 24:].reshape(2, 1, 3, 4)[:, 0]
    fused.write_kv(k_cache, v_cache, k, v, torch.tensor([1, 4]))
    assert torch.equal(k_cache[0, 1], k[0]) and torch.equal(v_cache[1, 4], v[1])
    assert k_cache.count_nonzero() == 2 * 12


@pytest.mark.usefixtures("interpreted_triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_add_layer_norm_matches_f_layer_norm(dtype, with_bias):
    d = 96  # not a power of two: the masked tail counts in neither mean nor variance
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(3, 1, d, generator=g).to(dtype), torch.randn(3, 1, d, generator=g).to(dtype)
    weight = torch.randn(d, generator=g).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype) if with_bias else None
    residual, out = fused.add_layer_norm(x, delta, weight, bias, 1e-5)
    if dtype == torch.float32:
        assert torch.equal(residual, x + delta)
    else:  # round-to-nearest-even on the GPU like the unfused add; the interpreter truncates (1 ulp)
        torch.testing.assert_close(residual, x + delta, rtol=2**-7, atol=0)
    ref = F.layer_norm((x + delta).float(), (d,), weight.float(), None if bias is None else bias.float(), 1e-5)
    # bf16: the interpreter's truncated residual may move an output by an ulp or two (2^-7 relative)
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=tol, atol=tol)
    same, out_alone = fused.add_layer_norm(x, None, weight, bias, 1e-5)
    assert same.data_ptr() == x.data_ptr()
    ref_alone = F.layer_norm(x.float(), (d,), weight.float(), None if bias is None else bias.float(), 1e-5)
    torch.testing.assert_close(out_alone.float(), ref_alone.to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.usefixtures("interpreted_triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gelu_is_exact_erf_gelu(monkeypatch, dtype):
    monkeypatch.setattr(fused, "_runs_triton", lambda t: True)  # CPU tensors through the interpreter
    x = (torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)  # > one block
    want = F.gelu(x.float())
    out = fused.gelu(x)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    # float32: erf from libdevice vs ATen's; bf16: F.gelu's rounding, 1 ulp where the interpreter truncates
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    tanh_form = F.gelu(x.float(), approximate="tanh")
    assert (want - tanh_form).abs().max() > 1e-4 if dtype == torch.float32 else True  # the test can tell
    same = fused.gelu(x, inplace=True)
    assert same.data_ptr() == x.data_ptr() and torch.equal(same, out)


def test_gelu_fallback_is_f_gelu():
    x = torch.randn(4, 33)
    assert torch.equal(fused.gelu(x), F.gelu(x))


@pytest.mark.parametrize("in_gemm", [True, False])
def test_add_linear_adds_into_the_residual(monkeypatch, in_gemm):
    from pipeline.engine import model as model_module

    linear = torch.nn.Linear(24, 16, bias=False)
    x, inp = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 24, dtype=torch.float64)
    linear = linear.double()
    want = x + linear(inp)
    if in_gemm:  # the CUDA path (one addmm_ into x), run here on CPU tensors
        monkeypatch.setattr(model_module, "gemm_accumulates", lambda x, linear: True)
    with torch.no_grad():
        out = model_module.add_linear(x, inp, linear)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert (out.data_ptr() == x.data_ptr()) == in_gemm  # in place only when it ran as the GEMM


@pytest.mark.usefixtures("interpreted_triton")
def test_triton_write_kv_matches_index_put(monkeypatch):
    b, length, h, d = 3, 7, 4, 8
    qkv = torch.randn(b, 1, 3 * h * d).to(torch.bfloat16)
    k = qkv[..., h * d : 2 * h * d].reshape(b, 1, h, d)[:, 0]  # [B, H, D]
    v = qkv[..., 2 * h * d :].reshape(b, 1, h, d)[:, 0]
    positions = torch.tensor([0, 6, 3])
    cache = torch.zeros(2, 2, b, length, h, d, dtype=torch.bfloat16)  # [K/V, layers, B, L, H, D]
    want = cache.clone()
    rows = torch.arange(b)
    want[0, 1][rows, positions] = k
    want[1, 1][rows, positions] = v
    monkeypatch.setattr(fused, "_runs_triton", lambda t: True)  # CPU tensors through the interpreter
    fused.write_kv(cache[0, 1], cache[1, 1], k, v, positions)
    assert torch.equal(cache, want)


class _CountingStep:
    """Stands in for a started decode step: advance() makes the next token 10 * (calls + 1) + row."""

    def __init__(self, batch: int) -> None:
        self.tokens = torch.tensor([10 + r for r in range(batch)])  # the first pick, from prefill
        self.advances = 0

    def advance(self) -> None:
        self.advances += 1
        self.tokens = torch.tensor([10 * (self.advances + 1) + r for r in range(len(self.tokens))])


@pytest.mark.parametrize(("finish_after", "max_new"), [(3, 8), (8, 8), (1, 8), (1, 1)])
def test_token_loop_is_one_step_ahead_and_drops_the_extra_step(finish_after, max_new):
    step = _CountingStep(batch=2)
    seen: list[list[int]] = []

    def consume(tokens: list[int]) -> bool:
        seen.append(tokens)
        return len(seen) >= finish_after

    n = run_token_loop(step, max_new, consume)  # type: ignore[arg-type]
    assert n == len(seen) == min(finish_after, max_new)
    assert seen == [[10 * (i + 1), 10 * (i + 1) + 1] for i in range(n)]  # in order, none skipped
    # the step after the last consumed one was already enqueued (and is discarded), never more;
    # at max_new_tokens nothing past the last token is decoded
    assert step.advances == min(n, max_new - 1)


@pytest.mark.usefixtures("interpreted_triton")
def test_decode_step_through_the_triton_kernels_equals_the_unfused_step(tiny_model, monkeypatch):
    model, tok = tiny_model
    ids = tok.encode("The agreement shall terminate upon written notice")
    caches, logits = [], []
    for triton_on in (False, True):
        monkeypatch.setattr(fused, "_runs_triton", lambda t, on=triton_on: on)
        cache = model.new_cache(1, len(ids) + 4)
        with torch.inference_mode():
            model.prefill(torch.tensor([ids]), cache)
            tokens, positions = torch.tensor([5]), torch.tensor([len(ids)])
            steps = []
            for _ in range(3):
                steps.append(model.decode(tokens, cache, positions))
                tokens, positions = steps[-1].argmax(-1), positions + 1
        caches.append(cache)
        logits.append(torch.stack(steps))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)  # LayerNorm sums in
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-5, atol=1e-5)  # another order


@pytest.mark.usefixtures("interpreted_triton")
@pytest.mark.parametrize("programs", [1, 24])
def test_split_k_decode_matches_blockwise(monkeypatch, programs):
    from pipeline.engine.backends import blockwise, splitk
    from pipeline.engine.config import alibi_slopes

    splitk._kernels.cache_clear()
    monkeypatch.setattr(splitk, "MIN_KEYS_PER_SPLIT", 64)  # several splits at a test-sized length
    monkeypatch.setattr(splitk, "_target_programs", lambda device: programs)
    b, length, h, d = 3, 300, 4, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, 1, h, d, generator=g)
    k_cache, v_cache = torch.randn(2, b, length, h, d, generator=g)
    lengths = torch.tensor([1, 129, 300])  # one key only, a split boundary inside, the whole cache
    slopes = alibi_slopes(h, 16)
    out = splitk.decode(q, k_cache, v_cache, slopes, lengths, scale=0.3)
    ref = blockwise.decode(q, k_cache, v_cache, slopes, lengths, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    splitk._kernels.cache_clear()


def test_split_plan_fills_the_chip_and_covers_every_key():
    from pipeline.engine.backends.splitk import BLOCK_N, split_plan

    for bh, length in [(32, 4160), (32, 65600), (32, 100), (64, 4160)]:
        splits, keys = split_plan(bh, length, 528)
        assert keys % BLOCK_N == 0 and splits * keys >= length > (splits - 1) * keys
    assert split_plan(32, 4160, 528)[0] == 17 and split_plan(32, 65600, 528)[0] == 17
