"""flash-attn 2 (Dao-AILab `flash_attn` 2.x, sm80+) prefill and decode with its native `alibi_slopes`.

flash-attn 2 adds -slope_h * |i + seqlen_k - seqlen_q - j| to each score and, with causal=True,
aligns the query block to the bottom-right of the keys: exactly this project's convention (query i
at absolute position Tk - Tq + i, keys after it masked). Decode uses `flash_attn_with_kvcache`,
whose split-KV keeps the whole chip busy for one long sequence. Selected where it is importable and
flash-attn-4 is not (Ampere/Ada GPUs, or Hopper without the CuTe DSL wheels).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "fa2"


def _flash_attn() -> Any:
    import flash_attn  # ImportError when absent: the registry then skips this backend

    if not str(getattr(flash_attn, "__version__", "")).startswith("2."):
        raise ImportError(f"flash_attn {getattr(flash_attn, '__version__', '?')} is not flash-attn 2")
    return flash_attn


def is_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        _flash_attn()
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *, scale: float) -> torch.Tensor:
    """q [B, Tq, H, D], k/v [B, Tk, H, D] -> [B, Tq, H, D] (see pipeline/engine/attention.py)."""
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]})")
    fa = _flash_attn()
    return fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, alibi_slopes=slopes.float())


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slopes: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """q [B, 1, H, D]; caches [B, L, H, D] already holding the new token at lengths[b] - 1."""
    fa = _flash_attn()
    return fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lengths.to(torch.int32), softmax_scale=scale, causal=True,
        alibi_slopes=slopes.float())
