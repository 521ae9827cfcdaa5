"""The flash-attn 2 backend's mapping onto flash-attn 2's documented semantics.

flash-attn 2 needs an sm80+ GPU, so its kernels are replaced here by a float64 model of what its
documentation specifies (bias -slope * |i + Tk - Tq - j|, causal aligned bottom-right, the cache
read up to cache_seqlens). What is tested is our side: the arguments we pass and the convention we
assume, against the project's own float64 reference and the blockwise backend.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from pipeline.engine.attention import dense_reference
from pipeline.engine.backends import blockwise, fa2
from pipeline.engine.config import alibi_slopes


def _documented_fa2(q, k, v, scale, causal, slopes, seqlens_k=None):
    """float64 model of flash-attn 2 for q [B, Tq, H, D], k/v [B, Tk, H, D]."""
    b, tq, h, _ = q.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    for row in range(b):
        tk = k.shape[1] if seqlens_k is None else int(seqlens_k[row])
        qd = q[row].double().transpose(0, 1)  # [H, Tq, D]
        kd, vd = (t[row, :tk].double().transpose(0, 1) for t in (k, v))  # [H, Tk, D]
        i = torch.arange(tq, dtype=torch.float64)[:, None]
        j = torch.arange(tk, dtype=torch.float64)[None, :]
        rel = i + tk - tq - j  # [Tq, Tk]
        scores = scale * qd @ kd.transpose(-1, -2) - slopes.double().view(h, 1, 1) * rel.abs()
        if causal:
            scores = scores.masked_fill(rel < 0, float("-inf"))
        out[row] = (torch.softmax(scores, -1) @ vd).transpose(0, 1)
    return out.to(q.dtype)


@pytest.fixture
def fake_flash_attn(monkeypatch):
    calls: list[dict] = []
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.7.4"

    def flash_attn_func(q, k, v, *, softmax_scale, causal, alibi_slopes):
        calls.append({"fn": "func", "causal": causal, "slopes_dtype": alibi_slopes.dtype})
        return _documented_fa2(q, k, v, softmax_scale, causal, alibi_slopes)

    def flash_attn_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, softmax_scale, causal, alibi_slopes):
        calls.append({"fn": "kvcache", "causal": causal, "seqlens_dtype": cache_seqlens.dtype})
        return _documented_fa2(q, k_cache, v_cache, softmax_scale, causal, alibi_slopes, cache_seqlens)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def test_fa2_is_never_available_on_cpu():
    assert fa2.is_available(torch.device("cpu")) is False


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.__version__ = "4.0.0b36"
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    with pytest.raises(ImportError, match="not flash-attn 2"):
        fa2.prefill(*(torch.randn(1, 4, 2, 8) for _ in range(3)), torch.ones(2), scale=0.3)


@pytest.mark.parametrize(("tq", "tk"), [(7, 7), (5, 19)])
def test_fa2_prefill_matches_reference(fake_flash_attn, tq, tk):
    torch.manual_seed(tq * 100 + tk)
    heads, dim = 4, 16
    q = torch.randn(2, tq, heads, dim)
    k, v = torch.randn(2, tk, heads, dim), torch.randn(2, tk, heads, dim)
    slopes = alibi_slopes(heads, 16.0)
    out = fa2.prefill(q, k, v, slopes, scale=dim**-0.5)
    torch.testing.assert_close(out, dense_reference(q, k, v, slopes, scale=dim**-0.5), rtol=1e-5, atol=1e-5)
    assert fake_flash_attn == [{"fn": "func", "causal": True, "slopes_dtype": torch.float32}]


def test_fa2_decode_matches_blockwise_on_a_ragged_batch(fake_flash_attn):
    torch.manual_seed(3)
    heads, dim, cache_len = 4, 16, 23
    q = torch.randn(3, 1, heads, dim)
    k_cache, v_cache = torch.randn(3, cache_len, heads, dim), torch.randn(3, cache_len, heads, dim)
    lengths = torch.tensor([1, 9, 23])
    slopes = alibi_slopes(heads, 8.0)
    out = fa2.decode(q, k_cache, v_cache, slopes, lengths, scale=0.25)
    ref = blockwise.decode(q, k_cache, v_cache, slopes, lengths, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fake_flash_attn == [{"fn": "kvcache", "causal": True, "seqlens_dtype": torch.int32}]
