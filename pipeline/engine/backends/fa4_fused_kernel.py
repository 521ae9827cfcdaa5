"""The patched sm90 score hook itself (imported by fa4_fused.install only where flash-attn-4 is).

Kept at module level with its imports at the top: the CuTe DSL re-parses jit functions and resolves
their names in the module's globals. See fa4_fused.py for what the patch does and why.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData
from quack import layout_utils

ALIBI_MARK = "__longdoc_alibi_fused__"
GENERIC_APPLY = FlashAttentionForwardSm90.apply_score_mod


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
    aux_data: AuxData = AuxData(),  # noqa: B008 (flash-attn-4's own signature)
    fastdiv_mods=None,
):
    if const_expr(getattr(self.score_mod, ALIBI_MARK, None) is None):
        GENERIC_APPLY(
            self, thr_mma_qk, batch_idx, head_idx, m_block, acc_S, n_block, softmax_scale, seqlen,
            aux_data, fastdiv_mods,
        )
    else:
        # compile-time constants of this score_mod: head h of the call has slope
        # 2^(log2_first + neg_step * (h + 1)); raw scores are in units of 1 / softmax_scale
        log2_first, neg_step, inv_scale = getattr(self.score_mod, ALIBI_MARK)
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)  # fragment -> (rows, cols) view
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS_mn = layout_utils.reshape_acc_to_mn(thr_mma_qk.partition_C(cS))
        # thread 0's column coordinates are compile-time constants; other threads add an offset
        t0ScS_mn = layout_utils.reshape_acc_to_mn(thr_mma_qk.get_slice(0).partition_C(cS))
        thr_col_offset = tScS_mn[0][1]
        exponent = Float32(log2_first) + Float32(neg_step) * Float32(head_idx + 1)
        slope = cute.math.exp2(exponent, fastmath=True) * Float32(inv_scale)
        # key index minus this tile's first query position (bottom-right aligned causal); the
        # per-row remainder -slope * (q - q0) is a row constant, which softmax ignores
        first = (
            n_block * self.tile_n + thr_col_offset - m_block * self.tile_m
            - (seqlen.seqlen_k - seqlen.seqlen_q)
        )
        base = slope * Float32(first)
        for c in cutlass.range_constexpr(cute.size(tScS_mn.shape[1])):
            bias = base + slope * Float32(t0ScS_mn[0, c][1])
            for r in cutlass.range_constexpr(cute.size(tScS_mn.shape[0])):
                acc_S_mn[r, c] = acc_S_mn[r, c] + bias
