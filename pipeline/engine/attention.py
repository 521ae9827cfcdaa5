"""The attention interface every backend implements (causal, ALiBi, multi-head).

Shapes and semantics (all backends, all devices):

- ``prefill(q, k, v, slopes, *, scale) -> out``: q [B, Tq, H, D]; k, v [B, Tk, H, D] with Tk >= Tq.
  The query block sits at the END of the key range: query i has absolute position Tk - Tq + i.
  score(i, j) = scale * q_i . k_j - slope_h * (pos_i - j); keys j > pos_i are masked.
  out [B, Tq, H, D] in q's dtype.
- ``decode(q, k_cache, v_cache, slopes, lengths, *, scale) -> out``: q [B, 1, H, D]; caches
  [B, L_max, H, D]; lengths [B] int64 = valid keys per sequence including the new token (whose
  position is lengths[b] - 1). Keys at j >= lengths[b] are masked. out [B, 1, H, D].
- slopes: [H] float32, all > 0 (see config.alibi_slopes).

Backends live in pipeline/engine/backends/; the registry there (`select_backend`) picks them. This
module imports none of them: the backends and the registry depend on it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PrefillFn = Callable[..., torch.Tensor]
DecodeFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """A prefill kernel and a decode kernel (they may come from different backend modules)."""

    name: str
    prefill: PrefillFn
    decode: DecodeFn
    prefill_name: str
    decode_name: str
    # compile_prefill(slopes, *, scale, head_dim, dtype) -> calls made: a JIT-compiling prefill
    # backend's kernels compiled ahead of use (engine warm-up); None where nothing compiles per call
    compile_prefill: Callable[..., int] | None = None


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Float64 full-matrix prefill attention: the oracle for tests and GPU checks (small T only:
    it materializes [B, H, Tq, Tk])."""
    tq, tk = q.shape[1], k.shape[1]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    qpos = torch.arange(tk - tq, tk, device=q.device, dtype=torch.float64)
    kpos = torch.arange(tk, device=q.device, dtype=torch.float64)
    rel = qpos[:, None] - kpos[None, :]  # [Tq, Tk], distance back from the query
    scores = scale * (qd @ kd.transpose(-1, -2)) - slopes.double().view(1, -1, 1, 1) * rel
    scores = scores.masked_fill(rel < 0, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vd  # [B, H, Tq, D]
    return out.transpose(1, 2).to(q.dtype)  # [B, Tq, H, D]
