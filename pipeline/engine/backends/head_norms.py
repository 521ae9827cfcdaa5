"""Per-head maximum vector norm of q or k, the input of the exact ALiBi window bound.

x [B, T, H, D] with any batch / position / head strides (q is a strided view of the fused QKV
projection) -> [H] float32, max over b, t of ||x[b, t, h, :]||. On CUDA one Triton pass reads x once
(the generic reduction over a strided view took 175 us per 16K-token tensor on the H200, 2.4% of a
16K prefill, bench/NOTES.md run 8); elsewhere torch ops.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.engine.fused import triton_next_power_of_2
from pipeline.engine.triton_lazy import triton_kernels

BLOCK_T = 64


@triton_kernels
def _kernel(triton: Any, tl: Any) -> Any:
    @triton.jit
    def norm_sq_max(
        x_ptr, out_ptr, T, stride_b, stride_t, stride_h,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        d = tl.arange(0, D_PAD)
        base = x_ptr + b * stride_b + h.to(tl.int64) * stride_h
        ptrs = base + t[:, None].to(tl.int64) * stride_t + d[None, :]
        x = tl.load(ptrs, mask=(t[:, None] < T) & (d[None, :] < D), other=0.0).to(tl.float32)
        # squared norms are >= 0, so float atomic max is exact
        tl.atomic_max(out_ptr + h, tl.max(tl.sum(x * x, axis=1), axis=0))

    return norm_sq_max


def head_norm_max(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (last dim contiguous) -> [H] float32 (float64 for float64 input)."""
    b, t, h, d = x.shape
    kernel = _kernel() if x.is_cuda and x.stride(-1) == 1 and x.dtype != torch.float64 else None
    if kernel is None or t == 0:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # never narrower than x
        return torch.linalg.vector_norm(x, dim=-1, dtype=acc).amax(dim=(0, 1))
    out = torch.zeros(h, device=x.device, dtype=torch.float32)
    grid = (-(-t // BLOCK_T), h, b)
    kernel[grid](
        x, out, t, x.stride(0), x.stride(1), x.stride(2),
        D=d, D_PAD=triton_next_power_of_2(d), BLOCK=BLOCK_T,
    )
    return out.sqrt_()
