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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gelu_lookup_is_f_gelu_bit_for_bit(monkeypatch, dtype):
    monkeypatch.setattr(fused, "_runs_triton", lambda t: True)  # CPU tensors through the interpreter
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)  # every value, NaN and inf too
    x = torch.cat([every, (torch.randn(3000, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)])
    out = fused.gelu(x)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    want = F.gelu(x)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))  # same bits, NaNs included
    same = fused.gelu(x, inplace=True)
    assert same.data_ptr() == x.data_ptr() and torch.equal(same.view(torch.int16), want.view(torch.int16))


def test_gelu_fallback_is_f_gelu():
    x = torch.randn(4, 33)  # float32 (no 16-bit table) and CPU: F.gelu itself
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


@pytest.fixture
def interpreted_splitk(interpreted_triton: None) -> Iterator[None]:
    from pipeline.engine.backends import splitk

    splitk._kernels.cache_clear()
    splitk._counters.clear()
    yield
    splitk._kernels.cache_clear()
    splitk._counters.clear()


def _decode_reference(q, k_cache, v_cache, slopes, lengths, scale):
    """Float64 dense attention of each row's query over its own first lengths[b] keys."""
    from pipeline.engine.attention import dense_reference

    rows = [
        dense_reference(q[i : i + 1].double(), k_cache[i : i + 1, :n].double(), v_cache[i : i + 1, :n].double(),
                        slopes, scale=scale)
        for i, n in enumerate(lengths.tolist())
    ]
    return torch.cat(rows)  # [B, 1, H, D] float64


@pytest.mark.usefixtures("interpreted_splitk")
@pytest.mark.parametrize("merge", ["last", "kernel"])
@pytest.mark.parametrize("bias_max", [8, 16])
@pytest.mark.parametrize(("block_n", "keys", "slots"), [(16, 32, False), (32, 96, False), (16, 48, True)])
def test_split_k_decode_matches_float64(monkeypatch, merge, bias_max, block_n, keys, slots):
    from pipeline.engine.backends import splitk
    from pipeline.engine.config import alibi_slopes

    monkeypatch.setattr(splitk, "MERGE_CHUNK", 4)  # 5-7 splits: the merge runs its multi-chunk loop

    b, length, h, d = 3, 200, 4, 16  # 200: not a multiple of the tile or the split
    g = torch.Generator().manual_seed(bias_max + keys)
    q = torch.randn(b, 1, h, d, generator=g)
    k_cache, v_cache = torch.randn(2, b, length, h, d, generator=g)
    lengths = torch.tensor([1, 77, 200])  # one key only, mid-split and mid-tile, the whole cache
    slopes = alibi_slopes(h, bias_max)
    cfg = splitk.SplitConfig(block_n=block_n, keys_per_split=keys, merge=merge, slots=slots)
    ref = _decode_reference(q, k_cache, v_cache, slopes, lengths, 0.3)
    for _ in range(2):  # the second call sees the counters the first one left (all reset to zero)
        out = splitk.decode(q, k_cache, v_cache, slopes, lengths, scale=0.3, config=cfg)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert not splitk._counters or not splitk._counters[q.device].any()


@pytest.mark.usefixtures("interpreted_splitk")
def test_split_k_decode_bf16_single_row_short_of_the_cache():
    from pipeline.engine.backends import splitk
    from pipeline.engine.config import alibi_slopes

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 4, 32, generator=g).bfloat16()
    k_cache, v_cache = torch.randn(2, 1, 150, 4, 32, generator=g).bfloat16()
    lengths = torch.tensor([131])  # keys 131.. hold data that must not be read: make it poison
    k_cache[:, 131:], v_cache[:, 131:] = float("nan"), float("nan")
    slopes = alibi_slopes(4, 8)
    out = splitk.decode(q, k_cache, v_cache, slopes, lengths, scale=32**-0.5,
                        config=splitk.SplitConfig(block_n=16, keys_per_split=64, slots=True))
    ref = _decode_reference(q, k_cache, v_cache, slopes, lengths, 32**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_split_configs_cover_every_key():
    from pipeline.engine.backends.splitk import CONFIGS, config_for, split_count

    limits = [limit for limit, _ in CONFIGS]
    assert limits == sorted(limits)
    for _, cfg in CONFIGS:
        assert cfg.keys_per_split % cfg.block_n == 0 and cfg.merge in ("last", "kernel")
    for length in (1, 100, 4160, 8192, 8193, 65600, 1 << 20):
        cfg = config_for(length)
        splits = split_count(length, cfg)
        assert splits * cfg.keys_per_split >= length > (splits - 1) * cfg.keys_per_split


@pytest.mark.usefixtures("interpreted_triton")
def test_triton_paged_write_keeps_block_key_norms_like_the_torch_rule(monkeypatch):
    """The decode write's kernel also keeps the paged pool's key norms (paged.update_key_norms' rule):
    a row at a block's first slot restarts that block's entry, the others take the max."""
    from pipeline.engine.backends import paged

    blocks, bs, h, d = 5 + 1, 4, 2, 8  # the last block is the pool's scratch block (its norms mean nothing)
    k = torch.randn(3, h, d).to(torch.bfloat16)
    v = torch.randn(3, h, d).to(torch.bfloat16)
    slots = torch.tensor([2 * bs, 3 * bs + 2, 1], dtype=torch.int32)  # first slot of block 2; mid-blocks 3, 0
    pools = [torch.zeros(blocks, bs, h, d, dtype=torch.bfloat16) for _ in range(4)]
    norms = [torch.full((blocks, h), 7.0) for _ in range(2)]  # stale entries
    paged.write(pools[0], pools[1], k, v, slots, key_norms=norms[0])  # CPU: the torch path
    monkeypatch.setattr(fused, "_runs_triton", lambda t: True)  # CPU tensors through the interpreter
    paged.write(pools[2], pools[3], k, v, slots, key_norms=norms[1])
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    torch.testing.assert_close(norms[1][:-1], norms[0][:-1], rtol=1e-6, atol=1e-6)
    want = torch.linalg.vector_norm(k.float(), dim=-1)
    assert torch.allclose(norms[1][2], want[0]) and (norms[1][3] == 7.0).all()  # restarted; max(7, small)
