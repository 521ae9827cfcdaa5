"""FlexAttention causal prefill with ALiBi as a score_mod (any CUDA GPU with Triton).

The fallback where flash-attn-4 is absent (non-Hopper GPUs, or its wheels missing). One compiled
flex_attention is shared by every call; block masks are cached per (Tq, Tk, device). The causal
offset and the slopes reach the score_mod as captured tensors, so new chunk positions do not
specialize the compiled kernel on their values.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

NAME = "flex"
_MAX_BLOCK_MASKS = 64  # (Tq, Tk) pairs; a 65K causal mask is ~0.5 MB of block indices


def is_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401  (flex_attention runs Triton kernels)
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_BLOCK_MASKS: dict[tuple[int, int, str], Any] = {}


def block_mask(tq: int, tk: int, device: torch.device) -> Any:
    """Causal BlockMask for a query block at the end of `tk` keys (query i at position tk - tq + i)."""
    key = (tq, tk, str(device))
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        offset = tk - tq

        def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return q_idx + offset >= kv_idx

        if len(_BLOCK_MASKS) >= _MAX_BLOCK_MASKS:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        mask = create_block_mask(causal, None, None, tq, tk, device=device)
        _BLOCK_MASKS[key] = mask
    return mask


def alibi_score_mod(slopes: torch.Tensor, offset: torch.Tensor) -> Any:
    """score - slope[h] * (q_idx + offset - kv_idx); `offset` is a 0-dim int tensor (Tk - Tq)."""

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score - slopes[h] * (q_idx + offset - kv_idx).to(torch.float32)

    return score_mod


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Causal ALiBi attention, q [B, Tq, H, D], k/v [B, Tk, H, D] (Tk >= Tq) -> [B, Tq, H, D]."""
    tq, tk = q.shape[1], k.shape[1]
    if tk < tq:
        raise ValueError(f"Tk ({tk}) must be >= Tq ({tq})")
    offset = torch.tensor(tk - tq, device=q.device, dtype=torch.int32)
    mod = alibi_score_mod(slopes.to(device=q.device, dtype=torch.float32), offset)
    out = _compiled_flex()(
        q.transpose(1, 2),  # [B, H, Tq, D]
        k.transpose(1, 2),  # [B, H, Tk, D]
        v.transpose(1, 2),
        score_mod=mod,
        block_mask=block_mask(tq, tk, q.device),
        scale=scale,
        kernel_options=kernel_options,
    )
    return out.transpose(1, 2)  # [B, Tq, H, D]
