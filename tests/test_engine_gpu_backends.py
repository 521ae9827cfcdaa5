"""CPU-checkable parts of the CUDA attention backends (fa4, flex, sdpa).

The kernels themselves run only on the H200 (bench/attention.py checks them against float64 there);
here: they refuse CPU devices cleanly, selection never picks them without CUDA, and the math each
one relies on (decode bias row, flex score/mask mods, fa4's slope series and int->float trick)
matches the float64 reference and the blockwise backend.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pipeline.engine.attention import dense_reference
from pipeline.engine.backends import (
    BackendUnavailable,
    blockwise,
    fa4,
    fa4_score_mods,
    flex,
    sdpa,
    select_backend,
)
from pipeline.engine.config import alibi_slopes

CPU = torch.device("cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("module", [fa4, flex, sdpa])
def test_gpu_backends_refuse_cpu(module):
    assert module.is_available(CPU) is False


def test_selection_on_cpu_never_picks_a_gpu_backend():
    backend = select_backend(CPU)
    assert backend.prefill_name == "blockwise" and backend.decode_name == "blockwise"
    for name in ("fa4", "flex", "sdpa"):
        with pytest.raises(BackendUnavailable, match=name):
            select_backend(CPU, prefer=name)


def test_fa4_prefill_without_flash_attn_raises_clearly(monkeypatch):
    monkeypatch.setattr(fa4, "_flash_attn_module", lambda: None)
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        fa4.prefill(q, q, q, torch.ones(2), scale=1.0)


@pytest.mark.parametrize(("n_heads", "bias_max"), [(32, 16), (32, 8), (64, 8), (4, 16)])
def test_fa4_recognises_mpt_slopes_as_a_geometric_series(n_heads, bias_max):
    step = fa4.geometric_step(alibi_slopes(n_heads, bias_max))
    assert step == pytest.approx(bias_max / n_heads, rel=1e-6)


def test_fa4_falls_back_for_non_geometric_slopes():
    # 12 heads: llm-foundry interleaves two series, so no single step fits; the kernel must read them
    assert fa4.geometric_step(alibi_slopes(12, 8)) is None
    assert fa4.geometric_step(torch.tensor([0.5, -0.25])) is None


def test_fa4_magic_int_to_float_is_exact_over_the_context_range():
    # The "fast" score_mod turns the key distance into float32 as bits(2^23 + d) - 2^23.
    d = torch.cat([torch.arange(0, 70_000), torch.tensor([2**22, 2**23 - 1])]).to(torch.int32)
    as_float = (d + fa4_score_mods._MAGIC_I2F).view(torch.float32) - fa4_score_mods._TWO_23
    assert torch.equal(as_float, d.to(torch.float32))


def test_sdpa_bias_row_matches_alibi_definition():
    slopes = alibi_slopes(4, 16)
    lengths = torch.tensor([3, 6])
    bias = sdpa.alibi_bias_row(slopes, lengths, 8, torch.float32)  # [B, H, 1, L]
    assert bias.shape == (2, 4, 1, 8)
    for b, n in enumerate(lengths.tolist()):
        for h in range(4):
            for j in range(8):
                expected = -slopes[h].item() * (n - 1 - j) if j < n else float("-inf")
                assert bias[b, h, 0, j].item() == pytest.approx(expected)


def test_sdpa_decode_ragged_batch_matches_reference_and_blockwise():
    torch.manual_seed(0)
    b, cap, h, d = 3, 40, 4, 16
    slopes = alibi_slopes(h, 16)
    q = torch.randn(b, 1, h, d)
    k, v = torch.randn(b, cap, h, d), torch.randn(b, cap, h, d)
    lengths = torch.tensor([1, 17, 40])
    out = sdpa.decode(q, k, v, slopes, lengths, scale=d**-0.5)
    assert out.shape == (b, 1, h, d)
    assert rel_err(out, blockwise.decode(q, k, v, slopes, lengths, scale=d**-0.5)) < 1e-5
    for i, n in enumerate(lengths.tolist()):
        ref = dense_reference(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], slopes, scale=d**-0.5)
        assert rel_err(out[i : i + 1], ref) < 1e-5


def test_sdpa_decode_bias_is_reused_within_a_step_and_rebuilt_after_it():
    slopes = alibi_slopes(4, 8)
    lengths = torch.tensor([5, 9])
    first = sdpa.decode_bias(slopes, lengths, 16, torch.float32)
    assert sdpa.decode_bias(slopes, lengths, 16, torch.float32) is first  # next layer, same step
    lengths += 1  # the generate loop advances in place
    advanced = sdpa.decode_bias(slopes, lengths, 16, torch.float32)
    assert advanced is not first
    assert torch.equal(advanced, sdpa.alibi_bias_row(slopes, lengths, 16, torch.float32))
    fresh = torch.tensor([2, 2])  # another tensor (another request's step) is never a hit
    rebuilt = sdpa.decode_bias(slopes, fresh, 16, torch.float32)
    assert rebuilt is not advanced and bool(rebuilt[:, :, :, 2:].isinf().all())


@pytest.mark.parametrize(("tq", "tk"), [(24, 24), (16, 56)])
def test_flex_score_and_block_mask_match_reference(tq, tk):
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(1)
    h, d = 4, 16
    slopes = alibi_slopes(h, 16)
    q, k, v = torch.randn(2, tq, h, d), torch.randn(2, tk, h, d), torch.randn(2, tk, h, d)
    mod = flex.alibi_score_mod(slopes, torch.tensor(tk - tq))
    mask = flex.block_mask(tq, tk, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused; fine at this size
        out = flex_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            score_mod=mod,
            block_mask=mask,
            scale=0.25,
        ).transpose(1, 2)
    assert rel_err(out, dense_reference(q, k, v, slopes, scale=0.25)) < 1e-5
    assert flex.block_mask(tq, tk, CPU) is mask  # cached per shape


def test_flex_prefill_rejects_more_queries_than_keys():
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="Tk"):
        flex.prefill(q, q[:, :4], q[:, :4], torch.ones(2), scale=1.0)


def test_decode_scale_is_applied():
    # a scale error would pass the reference test only if both sides shared it: check one known case
    slopes = torch.tensor([1e-9])
    q = torch.ones(1, 1, 1, 2)
    k = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # [1, 2, 1, 2]
    v = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    out = sdpa.decode(q, k, v, slopes, torch.tensor([2]), scale=0.5)
    w = 1 / (1 + math.exp(-1.0))  # softmax([0.5 * 2, 0])
    assert out[0, 0, 0].tolist() == pytest.approx([w, 1 - w], rel=1e-5)


def test_sdpa_decode_bias_is_reused_for_an_inference_lengths_tensor():
    """Mpt.decode runs under inference_mode: its per-step `lengths` has no version counter, and the
    bias must still be built once per step (object identity), not once per layer."""
    slopes = alibi_slopes(4, 8)
    with torch.inference_mode():
        positions = torch.tensor([4, 8])
        lengths = positions + 1
        first = sdpa.decode_bias(slopes, lengths, 16, torch.float32)
        assert sdpa.decode_bias(slopes, lengths, 16, torch.float32) is first
        next_lengths = lengths + 1  # the next step's fresh tensor
        following = sdpa.decode_bias(slopes, next_lengths, 16, torch.float32)
    assert following is not first
    assert torch.equal(following, sdpa.alibi_bias_row(slopes, next_lengths, 16, torch.float32))
