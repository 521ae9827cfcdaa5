"""The ALiBi score_mods flash-attn-4 runs through its generic hook (variants in fa4.py's docstring).

Each is a cute.jit function of (score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors) that gets
the score already multiplied by softmax_scale; one Python object per (variant, step, first head), so
flash-attn-4's compile cache hits. Imported lazily: only where flash-attn-4 (cutlass) is installed.
"""

from __future__ import annotations

import functools
from typing import Any

_MAGIC_I2F = 0x4B000000  # float32 bits of 2^23: int n in [0, 2^23) -> bits(2^23 + n)
_TWO_23 = 8388608.0


@functools.cache
def score_mod(variant: str, step: float | None = None, head_offset: int = 0) -> Any:
    """The cute.jit ALiBi score_mod for `variant` (one Python object per variant, step and first
    head, so flash-attn-4's compile cache hits). `score` arrives already multiplied by softmax_scale.
    `head_offset`: the call covers heads [head_offset, ...) of the model (exp2 only)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    if variant == "aux":
        VEC = 1  # flash-attn-4 runs score_mods one element at a time when aux tensors are present

        @cute.jit
        def alibi_aux(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
            offset = seqlen_info.seqlen_k - seqlen_info.seqlen_q
            dist = q_idx + scalar_to_ssa(offset, cutlass.Int32).broadcast_to((VEC,)) - kv_idx
            slopes = aux_tensors[0]
            h_frag = cute.make_rmem_tensor(1, cutlass.Int32)
            h_frag.store(h_idx)
            s_frag = cute.make_rmem_tensor(1, cutlass.Float32)
            s_frag[0] = slopes[h_frag[0]]
            return score - s_frag.load() * dist.to(cutlass.Float32)

        return alibi_aux

    if step is None:
        raise ValueError(f"score_mod variant {variant!r} needs the geometric step")
    neg_step = -float(step)
    log2_first = neg_step * head_offset  # slope exponent shift of this call's head 0
    if head_offset and variant != "exp2":
        raise ValueError(f"variant {variant!r} has no head offset")
    VEC = 2  # elements per score_mod call without aux tensors (flash-attn-4's sm90 default)

    if variant == "exp2":

        @cute.jit
        def alibi_exp2(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
            offset = seqlen_info.seqlen_k - seqlen_info.seqlen_q
            dist = q_idx + scalar_to_ssa(offset, cutlass.Int32).broadcast_to((VEC,)) - kv_idx
            head = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
            if cutlass.const_expr(log2_first != 0.0):
                slope = cute.math.exp2(head * cute.full_like(score, neg_step) + cute.full_like(score, log2_first))
            else:
                slope = cute.math.exp2(head * cute.full_like(score, neg_step))
            return score - slope * dist.to(cutlass.Float32)

        return alibi_exp2

    if variant == "kvonly":

        @cute.jit
        def alibi_kvonly(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
            # -slope * (pos_q - kv) minus its row constant -slope * pos_q: softmax is unchanged, one
            # integer op less per score, but |bias| grows with the key index (float32 rounding).
            head = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
            slope = cute.math.exp2(head * cute.full_like(score, neg_step))
            return score + slope * kv_idx.to(cutlass.Float32)

        return alibi_kvonly

    if variant == "fast":

        @cute.jit
        def alibi_fast(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
            # dist + 2^23 as float bits: exact for 0 <= dist < 2^23; masked (future) keys give
            # garbage that the causal mask overwrites with -inf right after this call.
            offset = seqlen_info.seqlen_k - seqlen_info.seqlen_q + _MAGIC_I2F
            biased = q_idx + scalar_to_ssa(offset, cutlass.Int32).broadcast_to((VEC,)) - kv_idx
            dist = biased.bitcast(cutlass.Float32) - cute.full_like(score, _TWO_23)
            head = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
            slope = cute.math.exp2(head * cute.full_like(score, neg_step))
            return score - slope * dist

        return alibi_fast

    raise ValueError(f"unknown fa4 ALiBi score_mod variant {variant!r}")
