"""Fused decode GEMVs (pipeline/engine/gemv.py): the Triton kernel against the torch fallback (the
unfused ops the model runs today), through Triton's interpreter on CPU (TRITON_INTERPRET=1, set by
conftest.py). Small shapes: N = 96 and K = 320 are not multiples of every block, so the masked tails
run too. bench/gemv_fused.py checks the same on the H200 at MPT-7B's shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from pipeline.engine import gemv as gemv_mod
from pipeline.engine.gemv import GemvConfig, Norm, fusable_gemv, gemv, gemv_reference
from pipeline.engine.model import LayerNorm

N, K = 96, 320
SMALL = GemvConfig(block_n=32, block_k=64, num_warps=4, num_stages=2)  # 3 programs, 4 steps along K
RAGGED = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=2)  # masked N and K tails
PREFETCH = GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=1, prefetch=True)


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CPU tensors through the jitted kernel (interpreted)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before triton's first import: it is read then too
    pytest.importorskip("triton")
    gemv_mod._triton.cache_clear()
    monkeypatch.setattr(gemv_mod, "_runs_triton", lambda t: True)
    monkeypatch.setattr(gemv_mod.KERNELS, "gemv_max_rows", gemv_mod.MAX_ROWS)  # the kernel's whole range
    yield
    gemv_mod._triton.cache_clear()


def _operands(dtype: torch.dtype, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(dtype)

    return {
        "x": randn(rows, 1, K, scale=2.0) + 0.5,  # [B, 1, K] as the decode step has it; nonzero mean
        "w": randn(N, K, scale=0.1),
        "bias": randn(N),
        "norm_w": 1.0 + randn(K, scale=0.2),
        "norm_b": randn(K, scale=0.2),
        "residual": randn(rows, 1, N),
    }


def _assert_matches(out: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: same math up to summation order. bf16: the same roundings, so all but a few outputs
    (whose float32 sums straddle a rounding boundary) are identical, and those differ by one ulp."""
    assert out.dtype == want.dtype and out.shape == want.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        return
    diff = (out.float() - want.float()).abs()
    ulp = want.float().abs().clamp(min=2**-20) * 2**-7  # one bf16 ulp at most (8 mantissa bits)
    assert (diff <= ulp).all(), f"max diff {diff.max().item()}"
    assert (diff > 0).float().mean() <= 0.05


PROLOGUES = {
    "plain": {},
    "bias": {"bias": True},
    "norm_no_bias+bias": {"norm": "weight_only", "bias": True},
    "gelu+residual": {"gelu": True, "residual": True},
    "norm+residual": {"norm": True, "residual": True},
    "all": {"norm": True, "gelu": True, "bias": True, "residual": True},
}


def _call_kwargs(ops: dict[str, torch.Tensor], spec: dict) -> dict:
    kwargs: dict = {"gelu": spec.get("gelu", False)}
    if spec.get("bias"):
        kwargs["bias"] = ops["bias"]
    if spec.get("norm"):
        bias = ops["norm_b"] if spec["norm"] is True else None
        kwargs["norm"] = Norm(ops["norm_w"], bias, 1e-5)
    if spec.get("residual"):
        kwargs["residual"] = ops["residual"]
    return kwargs


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("prologue", list(PROLOGUES))
def test_kernel_matches_the_unfused_ops(dtype, rows, prologue):
    ops = _operands(dtype, rows)
    kwargs = _call_kwargs(ops, PROLOGUES[prologue])
    want = gemv_reference(ops["x"], ops["w"], **kwargs)
    for config in (SMALL, RAGGED, PREFETCH) if rows == 1 else (SMALL, RAGGED):
        _assert_matches(gemv(ops["x"], ops["w"], config=config, **kwargs), want)


@pytest.mark.usefixtures("interpreted")
def test_statistics_over_several_loads(monkeypatch):
    """LayerNorm statistics looped over K in chunks (long rows, many rows) equal the one-load path."""
    ops = _operands(torch.bfloat16, 2)
    norm = Norm(ops["norm_w"], ops["norm_b"], 1e-5)
    one_load = gemv(ops["x"], ops["w"], norm=norm, config=SMALL)
    monkeypatch.setattr(gemv_mod, "STATS_ELEMENTS", 64)  # 2 rows: 32-column chunks, 10 per row
    monkeypatch.setattr(gemv_mod, "_STATS_MIN", 32)
    chunked = gemv(ops["x"], ops["w"], norm=norm, config=SMALL)
    _assert_matches(chunked, gemv_reference(ops["x"], ops["w"], norm=norm))
    torch.testing.assert_close(chunked, one_load, rtol=2**-7, atol=0)


@pytest.mark.usefixtures("interpreted")
def test_kernel_rounds_where_the_unfused_model_does():
    """bf16 inputs chosen so that skipping a rounding shows: a LayerNorm / GELU kept in float32, or
    a residual added before the linear's output is rounded, moves many outputs by an ulp or more."""
    ops = _operands(torch.bfloat16, 1, seed=3)
    norm = Norm(ops["norm_w"], ops["norm_b"], 1e-5)
    out = gemv(ops["x"], ops["w"], norm=norm, gelu=True, residual=ops["residual"], config=SMALL)
    exact = gemv_reference(ops["x"], ops["w"], norm=norm, gelu=True, residual=ops["residual"])
    h = F.layer_norm(ops["x"].float(), (K,), norm.weight.float(), norm.bias.float(), 1e-5)
    unrounded = (ops["residual"].float() + F.linear(F.gelu(h), ops["w"].float())).to(torch.bfloat16)
    assert (out != unrounded).float().mean() > 0.1  # the check below can tell the two apart
    _assert_matches(out, exact)


@pytest.mark.parametrize("low_precision", [True, False])
def test_fallback_is_the_model_s_ops(low_precision):
    """Off CUDA, gemv is model.LayerNorm.forward, F.gelu, nn.Linear and `x + y`, bit for bit."""
    ops = _operands(torch.float32, 2)
    ln = LayerNorm(K, eps=1e-5, bias=True, low_precision=low_precision)
    with torch.no_grad():
        ln.weight.copy_(ops["norm_w"])
        ln.bias.copy_(ops["norm_b"])
    norm = Norm(ln.weight, ln.bias, ln.eps, low_precision)
    assert not fusable_gemv(ops["x"], ops["w"])
    got = gemv(ops["x"], ops["w"], bias=ops["bias"], norm=norm, gelu=True, residual=ops["residual"])
    want = ops["residual"] + F.linear(F.gelu(ln(ops["x"])), ops["w"], ops["bias"])
    assert torch.equal(got, want)


@pytest.mark.usefixtures("interpreted")
def test_fusable_gemv_refuses_what_the_kernel_cannot_do(monkeypatch):
    ops = _operands(torch.bfloat16, 1)
    x, w = ops["x"], ops["w"]
    assert fusable_gemv(x, w, bias=ops["bias"], residual=ops["residual"])
    assert fusable_gemv(torch.randn(8, K).to(torch.bfloat16), w)
    assert not fusable_gemv(torch.randn(9, K).to(torch.bfloat16), w)  # more rows than MAX_ROWS
    assert not fusable_gemv(x.float(), w)  # dtype mismatch
    assert not fusable_gemv(x.double(), w.double())  # no rounding code for float64
    assert not fusable_gemv(x, w.t().contiguous().t())  # column-major weight
    assert not fusable_gemv(x[..., :128], w)  # K mismatch
    assert not fusable_gemv(torch.randn(1, 2 * K).to(torch.bfloat16)[:, ::2], w)  # strided K
    assert not fusable_gemv(x, w[:, None])  # not a matrix
    assert not fusable_gemv(x, w, bias=ops["bias"][:50])
    assert not fusable_gemv(x, w, norm=Norm(ops["norm_w"][:100], None, 1e-5))
    assert not fusable_gemv(x, w, residual=ops["residual"].float())  # would promote: out's dtype changes
    assert not fusable_gemv(x, w, residual=ops["residual"][..., :50])
    monkeypatch.setattr(gemv_mod.KERNELS, "gemv_max_rows", 1)  # the default: batch rows go to cuBLAS
    assert not fusable_gemv(torch.randn(2, K).to(torch.bfloat16), w)
    assert fusable_gemv(x, w)
    monkeypatch.setattr(gemv_mod.KERNELS, "gemv", False)
    assert not fusable_gemv(x, w)


def test_off_cuda_nothing_is_fusable():
    ops = _operands(torch.bfloat16, 1)
    assert not fusable_gemv(ops["x"], ops["w"])


@pytest.mark.usefixtures("interpreted")
def test_refused_calls_run_the_fallback():
    """A call the kernel cannot take (9 rows) still returns the unfused result."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, K, generator=g), torch.randn(N, K, generator=g)
    assert torch.equal(gemv(x, w, gelu=True), F.linear(F.gelu(x), w))


@pytest.mark.usefixtures("interpreted", "engine_single_thread")
def test_decode_through_fused_gemvs_matches_the_unfused_step(tiny_ckpt_sw):
    """Mpt.decode with every projection a fused GEMV (Block.decode_fused, LM head included) against the
    unfused step on the same cache: logits within float32 rounding, for 2 steps of 1 row (the path the
    kernel takes on CUDA), on the checkpoint with clip_qkv, 6 heads and alibi_bias_max 16."""
    from pipeline.engine.load import load

    model, _ = load(tiny_ckpt_sw, dtype=torch.float32)
    tokens = torch.tensor([[5, 17, 3, 99, 42, 7]])
    x = model.wte(tokens[:, :1])[:, 0]  # [1, d_model]: what fusable_gemv sees for a batch of one
    assert model._fused_gemv_decode(x[:, None])
    logits = {}
    for fused_path in (True, False):
        cache = model.new_cache(1, 16)
        model.prefill(tokens, cache)
        gemv_mod.KERNELS.gemv = fused_path
        try:
            steps, token = [], torch.tensor([11])
            for i in range(2):
                out = model.decode(token, cache, torch.tensor([tokens.shape[1] + i]))
                steps.append(out)
                token = out.argmax(-1)
        finally:
            gemv_mod.KERNELS.gemv = True
        logits[fused_path] = torch.stack(steps)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
