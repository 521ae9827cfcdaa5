"""Blockwise attention and ALiBi slopes against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.engine.attention import dense_reference
from pipeline.engine.backends import BackendUnavailable, blockwise, select_backend
from pipeline.engine.config import alibi_slopes

pytestmark = pytest.mark.usefixtures("engine_single_thread")


def naive_attention(q, k, v, slopes, scale, positions, n_keys):
    """Per-query float64 loops: query r of row b sits at positions[b][r] and sees keys [0, pos]
    among the first n_keys[b] keys."""
    b, tq, h, d = q.shape
    out = torch.zeros(b, tq, h, d, dtype=torch.float64)
    for bi in range(b):
        for r in range(tq):
            pos = positions[bi][r]
            keys = torch.arange(min(pos + 1, n_keys[bi]))
            for hi in range(h):
                s = scale * (k[bi, keys, hi].double() @ q[bi, r, hi].double())
                s = s - slopes[hi].double() * (pos - keys).double()
                out[bi, r, hi] = torch.softmax(s, 0) @ v[bi, keys, hi].double()
    return out


@pytest.mark.parametrize(("tq", "tk", "block_q", "block_k"), [(37, 37, 8, 16), (5, 70, 4, 16), (64, 100, 64, 7)])
def test_blockwise_prefill_matches_float64_reference(tq, tk, block_q, block_k):
    g = torch.Generator().manual_seed(tq * tk)
    b, h, d = 2, 3, 16
    q, k, v = (torch.randn(b, t, h, d, generator=g) * 2 for t in (tq, tk, tk))
    slopes = alibi_slopes(h, 16)
    scale = 1 / math.sqrt(d)
    out = blockwise.prefill(q, k, v, slopes, scale=scale, block_q=block_q, block_k=block_k)
    positions = [list(range(tk - tq, tk))] * b
    ref = naive_attention(q, k, v, slopes, scale, positions, [tk] * b)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_reference(q, k, v, slopes, scale=scale).double(), ref, rtol=1e-5, atol=1e-5)


def test_skipping_alibi_negligible_key_blocks_is_exact_and_happens(monkeypatch):
    """Steep slopes over a long range: far key blocks of most heads underflow to 0 and are skipped."""
    g = torch.Generator().manual_seed(5)
    b, tq, tk, h, d = 1, 48, 1500, 3, 8
    q, k, v = (torch.randn(b, t, h, d, generator=g) for t in (tq, tk, tk))
    slopes = torch.tensor([1.0, 0.25, 2.0**-9])
    heads_seen = []
    real_attend = blockwise._attend

    def counting(qb, *args):
        heads_seen.append(qb.shape[1])
        return real_attend(qb, *args)

    monkeypatch.setattr(blockwise, "_attend", counting)
    skipped = blockwise.prefill(q, k, v, slopes, scale=0.35, block_q=16, block_k=64)
    work_skipped, heads_seen[:] = sum(heads_seen), []
    full = blockwise.prefill(q, k, v, slopes, scale=0.35, block_q=16, block_k=64, skip_negligible=False)
    assert sum(heads_seen) > 1.6 * work_skipped  # the two steep heads stopped early
    torch.testing.assert_close(skipped, full, rtol=0, atol=1e-6)
    ref = naive_attention(q, k, v, slopes, 0.35, [list(range(tk - tq, tk))], [tk])
    torch.testing.assert_close(skipped.double(), ref, rtol=1e-5, atol=1e-5)


def test_blockwise_prefill_keeps_bfloat16_inputs_accurate():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 50, 2, 8, generator=g).bfloat16() for _ in range(3))
    slopes = alibi_slopes(2, 8)
    out = blockwise.prefill(q, k, v, slopes, scale=0.35, block_q=16, block_k=16)
    ref = naive_attention(q, k, v, slopes, 0.35, [list(range(50))], [50])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_blockwise_decode_respects_per_sequence_lengths():
    g = torch.Generator().manual_seed(1)
    b, l_max, h, d = 3, 40, 4, 8
    q = torch.randn(b, 1, h, d, generator=g)
    k_cache, v_cache = torch.randn(b, l_max, h, d, generator=g), torch.randn(b, l_max, h, d, generator=g)
    lengths = torch.tensor([1, 17, 40])
    slopes = alibi_slopes(h, 8)
    out = blockwise.decode(q, k_cache, v_cache, slopes, lengths, scale=0.3, block_k=8)
    ref = naive_attention(q, k_cache, v_cache, slopes, 0.3, [[n - 1] for n in lengths.tolist()], lengths.tolist())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_slopes_follow_llm_foundry_gen_slopes():
    # power of two: 2^-(i * max / n)
    assert torch.equal(alibi_slopes(8, 8), torch.tensor([2.0**-i for i in range(1, 9)]))
    assert torch.equal(alibi_slopes(4, 16), torch.tensor([2.0**-4, 2.0**-8, 2.0**-12, 2.0**-16]))
    # 6 heads: slopes over 8, odd-indexed ones first, then even-indexed, truncated
    expected = [2.0**-e for e in (2, 4, 6, 8, 1, 3)]
    assert torch.equal(alibi_slopes(6, 8), torch.tensor(expected))


@pytest.mark.parametrize("n_heads", [4, 6, 12, 32])
def test_slopes_match_transformers_mpt_at_bias_max_8(n_heads):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    hf = build_mpt_alibi_tensor(n_heads, 2)  # [H, 1, 2]: row = (-1, 0) * slope
    torch.testing.assert_close(-hf[:, 0, 0], alibi_slopes(n_heads, 8))


def test_cpu_selects_blockwise_and_rejects_unknown_backend():
    backend = select_backend("cpu")
    assert backend.name == "blockwise" and backend.prefill is blockwise.prefill
    with pytest.raises(BackendUnavailable):
        select_backend("cpu", prefer="no-such-kernel")
