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
the patch still computes the same attention. The slope series and softmax scale are compile-time
constants of each marked score_mod (flash-attn-4 4.0.0b36's runtime aux_scalars failed to compile
on the H200, bench/NOTES.md run 6), so each head group's first head index compiles its own kernel
(~3 s, once per process).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import Any

log = logging.getLogger(__name__)

ALIBI_MARK = "__longdoc_alibi_fused__"
# flash-attn-4 releases whose sm90 internals this patch was written against and measured with
TESTED_VERSIONS = ("4.0.0b36",)


@functools.cache
def install() -> bool:
    """Patch flash-attn-4 (once per process). False if its internals are not what this expects."""
    try:
        version = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version not in TESTED_VERSIONS:
        log.warning("fused ALiBi patch not installed: flash-attn-4 %s is not one of %s", version, TESTED_VERSIONS)
        return False
    try:
        from flash_attn.cute import utils as fa_utils

        from pipeline.engine.backends import fa4_fused_kernel as kernel
    except Exception as exc:  # flash-attn-4 absent or reorganised
        log.warning("fused ALiBi patch not installed: %s", exc)
        return False
    generic_scale = fa_utils.compute_softmax_scale_log2

    def compute_softmax_scale_log2(softmax_scale: Any, score_mod: Any) -> Any:
        if getattr(score_mod, ALIBI_MARK, None) is not None:
            return softmax_scale * fa_utils.LOG2_E, None  # folded into exp2, as with no score_mod
        return generic_scale(softmax_scale, score_mod)

    fa_utils.compute_softmax_scale_log2 = compute_softmax_scale_log2
    kernel.FlashAttentionForwardSm90.apply_score_mod = kernel.apply_score_mod
    log.info("flash-attn-4 sm90 forward patched for fused ALiBi")
    return True


@functools.cache
def score_mod(step: float, head_offset: int, scale: float) -> Any:
    """The marked ALiBi score_mod for heads [head_offset, ...) of a model whose head h (0-based) has
    slope 2^(-step * (h + 1)); one object (and one compiled kernel) per distinct triple. Through the
    generic hook (patch not installed) it is a correct, slower ALiBi mod."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    VEC = 2  # flash-attn-4's sm90 score_mod vector width without aux tensors
    neg_step, log2_first = -float(step), -float(step) * head_offset

    @cute.jit
    def alibi_fused(score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        offset = seqlen_info.seqlen_k - seqlen_info.seqlen_q
        dist = q_idx + scalar_to_ssa(offset, cutlass.Int32).broadcast_to((VEC,)) - kv_idx
        head = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
        slope = cute.math.exp2(head * cute.full_like(score, neg_step) + cute.full_like(score, log2_first))
        return score - slope * dist.to(cutlass.Float32)

    setattr(alibi_fused, ALIBI_MARK, (log2_first, neg_step, 1.0 / float(scale)))
    return alibi_fused
