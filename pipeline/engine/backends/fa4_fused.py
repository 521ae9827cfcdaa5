"""ALiBi folded into flash-attn-4's sm90 forward kernel, bypassing its generic score_mod path.

Through the generic hook every score pays for flash-attn-4's bookkeeping: the kernel multiplies each
score by softmax_scale before the score_mod (instead of folding the scale into the exp2 FMA, as it
does without one), builds q/kv index vectors and calls the mod two elements at a time; an identity
score_mod alone costs 6% at 65K (bench/NOTES.md run 1). ALiBi needs much less. Within one tile,
-slope * (q - kv) = slope * (kv - q0) - slope * (q - q0) with q0 the tile's first query: the second
term is constant along each row, and softmax ignores row constants, so the tile needs only a
per-column bias. This module patches two flash-attn-4 internals for score_mods marked with
`ALIBI_MARK`:

- `compute_softmax_scale_log2` keeps the softmax scale folded into exp2 (scale * log2 e), as for no
  score_mod, so raw scores are never rescaled;
- `FlashAttentionForwardSm90.apply_score_mod` adds slope / scale * (kv - q0) to each raw score: per
  thread one float conversion per tile, one FMA per column it holds, one add per score.

Kernels for unmarked score_mods compile exactly as before (the patched hook forwards to the
original). The marked score_mod is itself a correct generic ALiBi mod, so a kernel compiled without
the patch still computes the same attention. Per-call values travel as flash-attn-4 aux_scalars
(runtime arguments, one compiled kernel for every head group): (log2 slope of head "-1" of this
call, -step per head, 1 / softmax_scale); head h of the call has slope 2^(s0 + s1 * (h + 1)).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

ALIBI_MARK = "__longdoc_alibi_fused__"


@functools.cache
def install() -> bool:
    """Patch flash-attn-4 (once per process). False if its internals are not what this expects."""
    try:
        import cutlass
        import cutlass.cute as cute
        from cutlass import Float32, const_expr
        from flash_attn.cute import utils as fa_utils
        from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
        from flash_attn.cute.utils import AuxData
        from quack import layout_utils
    except Exception as exc:  # flash-attn-4 absent or reorganised
        log.warning("fused ALiBi patch not installed: %s", exc)
        return False
    generic_scale = fa_utils.compute_softmax_scale_log2
    generic_apply = FlashAttentionForwardSm90.apply_score_mod
    if getattr(generic_apply, ALIBI_MARK, False):
        return True

    def compute_softmax_scale_log2(softmax_scale: Any, score_mod: Any) -> Any:
        if getattr(score_mod, ALIBI_MARK, False):
            return softmax_scale * fa_utils.LOG2_E, None  # folded into exp2, as with no score_mod
        return generic_scale(softmax_scale, score_mod)

    @cute.jit
    def apply_score_mod(
        self,
        thr_mma_qk,
        batch_idx,
        head_idx,
        m_block,
        acc_S,
        n_block,
        softmax_scale,
        seqlen,
        aux_data: AuxData = AuxData(),  # noqa: B008 (flash-attn-4's own default)
        fastdiv_mods=None,
    ):
        if const_expr(not getattr(self.score_mod, ALIBI_MARK, False)):
            generic_apply(
                self, thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block, softmax_scale, seqlen,
                aux_data, fastdiv_mods,
            )
        else:
            acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)  # fragment -> (rows, cols) view
            cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
            tScS_mn = layout_utils.reshape_acc_to_mn(thr_mma_qk.partition_C(cS))
            # thread 0's column coordinates are compile-time constants; others add their own offset
            t0ScS_mn = layout_utils.reshape_acc_to_mn(thr_mma_qk.get_slice(0).partition_C(cS))
            thr_col_offset = tScS_mn[0][1]
            log2_slope, step_log2, inv_scale = aux_data.scalars
            slope = cute.math.exp2(log2_slope + step_log2 * Float32(head_idx + 1), fastmath=True) * inv_scale
            # key index minus this tile's first query position (bottom-right aligned causal)
            first = (
                n_block * self.tile_n + thr_col_offset - m_block * self.tile_m
                - (seqlen.seqlen_k - seqlen.seqlen_q)
            )
            base = slope * Float32(first)
            for c in cutlass.range_constexpr(cute.size(tScS_mn.shape[1])):
                bias = base + slope * Float32(t0ScS_mn[0, c][1])
                for r in cutlass.range_constexpr(cute.size(tScS_mn.shape[0])):
                    acc_S_mn[r, c] = acc_S_mn[r, c] + bias

    setattr(apply_score_mod, ALIBI_MARK, True)
    fa_utils.compute_softmax_scale_log2 = compute_softmax_scale_log2
    FlashAttentionForwardSm90.apply_score_mod = apply_score_mod
    log.info("flash-attn-4 sm90 forward patched for fused ALiBi")
    return True


@functools.cache
def score_mod() -> Any:
    """The marked ALiBi score_mod (also correct, slower, if a kernel runs it through the generic hook)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    VEC = 2  # flash-attn-4's sm90 score_mod vector width without aux tensors

    @cute.jit
    def alibi_fused(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors, aux_scalars):
        log2_slope, step_log2, _inv_scale = aux_scalars
        offset = seqlen_info.seqlen_k - seqlen_info.seqlen_q
        dist = q_idx + scalar_to_ssa(offset, cutlass.Int32).broadcast_to((VEC,)) - kv_idx
        head = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
        base = scalar_to_ssa(log2_slope, cutlass.Float32).broadcast_to((VEC,))
        step = scalar_to_ssa(step_log2, cutlass.Float32).broadcast_to((VEC,))
        slope = cute.math.exp2(base + head * step)
        return score - slope * dist.to(cutlass.Float32)

    setattr(alibi_fused, ALIBI_MARK, True)
    return alibi_fused


def scalars(step: float, head_offset: int, scale: float) -> tuple[float, float, float]:
    """aux_scalars for a call over heads [head_offset, ...) of a model whose head h (0-based) has
    slope 2^(-step * (h + 1))."""
    return (-step * head_offset, -step, 1.0 / scale)
