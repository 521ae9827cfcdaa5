"""Fused kernels (Triton on CUDA): residual add + LayerNorm, the new token's K/V cache write, exact GELU.

Batch-1 decode replays ~500 kernels per token from one CUDA graph; the small ones are paid in launch
latency, not bytes. Unfused, each LayerNorm is one 7.6 us kernel with one block per 4096-vector (65 per
step) and each residual add another kernel; each layer's cache write is two index_put kernels plus an
arange (H200 profile, bench/NOTES.md). Here a block's residual add and the following norm are one
kernel, and a layer's K and V writes are one. In prefill, torch's LayerNorm and erf GELU kernels ran
at ~55-65% of the H200's bandwidth on 16K-token activations (bench/NOTES.md runs 9-10); the Triton
LayerNorm and the table-lookup GELU here stream faster with the same results.

Both have a torch fallback with exactly the unfused math (CPU, torch.compile, no Triton), so CPU results
are bit-identical to the plain model. `KERNELS` switches each fusion off, for the bench's before/after
rows; a CUDA graph keeps what was on when it was captured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.engine.triton_lazy import runs_on, triton_kernels


@dataclass
class FusedKernels:
    """Which fused kernels the model uses where Triton runs (read at each call / capture)."""

    add_norm: bool = True
    kv_write: bool = True
    gelu: bool = True
    residual_gemm: bool = True  # prefill: `x + linear(h)` as one in-place GEMM with beta = 1 (model.py)
    gemv: bool = True  # decode: each projection one fused GEMV kernel (gemv.py)
    # rows the GEMV kernel is used for: it handles up to gemv.MAX_ROWS, but on the H200 beyond one row
    # it lost to cuBLAS + the separate kernels (each program recomputes LN / GELU for every row)
    gemv_max_rows: int = 1


KERNELS = FusedKernels()


@triton_kernels
def _triton(triton: Any, tl: Any) -> Any:
    """The jitted kernels, or None when Triton is not installed."""

    @triton.jit
    def add_layer_norm(
        x_ptr, delta_ptr, res_ptr, out_ptr, w_ptr, b_ptr, n_cols, eps,
        HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row * n_cols + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x += tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # rounded to the activation dtype and normalized from there, as `x = x + a; norm(x)` does
            x = x.to(res_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(res_ptr + offs, x, mask=mask)
            x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        y = centred * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def write_kv(
        k_ptr, v_ptr, src_row_stride, k_cache_ptr, v_cache_ptr, cache_row_stride, cache_pos_stride,
        positions_ptr, n_cols, norms_ptr, n_heads, block_size, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
        NORMS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        position = tl.load(positions_ptr + row).to(tl.int64)
        src = row * src_row_stride + cols
        dst = row * cache_row_stride + position * cache_pos_stride + cols
        k = tl.load(k_ptr + src, mask=mask, other=0.0)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)
        if NORMS:  # the paged pool's per-block key norms (position = the slot; paged.update_key_norms)
            kf = k.to(tl.float32)
            norm = tl.sqrt(tl.sum(tl.reshape(kf * kf, (BLOCK // HEAD_DIM, HEAD_DIM)), axis=1))  # [heads here]
            head = tl.program_id(1) * (BLOCK // HEAD_DIM) + tl.arange(0, BLOCK // HEAD_DIM)
            at = norms_ptr + (position // block_size) * n_heads + head
            live = head < n_heads
            old = tl.load(at, mask=live, other=0.0)
            fresh = position % block_size == 0  # the block's first key: what it held before is gone
            tl.store(at, tl.where(fresh, norm, tl.maximum(old, norm)), mask=live)

    @triton.jit
    def gelu_lookup(x_ptr, out_ptr, table_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF  # int16 -> table index
        tl.store(out_ptr + offs, tl.load(table_ptr + bits, mask=mask), mask=mask)

    return add_layer_norm, write_kv, gelu_lookup


def _runs_triton(x: torch.Tensor) -> bool:
    return runs_on(x, _triton)


def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Triton kernel for `residual = x + delta` (x alone when delta is None) and
    `layer_norm(residual)` over the last dim; returns (residual, normalized), both in x's dtype.

    Statistics and affine in float32, output rounded once: F.layer_norm's math for both MPT norms (the
    low-precision one on bf16 CUDA tensors also accumulates in float32). Caller checks `fusable_norm`."""
    add_norm_kernel = _triton()[0]
    n_cols = x.shape[-1]
    x = x.contiguous()
    residual = x
    if delta is not None:
        delta = delta.contiguous()
        residual = torch.empty_like(x)
    out = torch.empty_like(x)
    block = triton_next_power_of_2(n_cols)
    add_norm_kernel[(x.numel() // n_cols,)](
        x, delta if delta is not None else x, residual, out, weight, bias if bias is not None else weight,
        n_cols, eps, HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return residual, out


def fusable_norm(x: torch.Tensor) -> bool:
    """Whether add_layer_norm runs its Triton kernel for x (else the caller runs the torch ops)."""
    return KERNELS.add_norm and _runs_triton(x)


_GELU_BLOCK = 1024


def gelu(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """F.gelu(x) (exact erf form). For 16-bit x on CUDA, one Triton kernel that looks each value up in
    a table of F.gelu over all 65,536 values of the dtype: bit-identical to F.gelu by construction, and
    a gather from a 128 KB cache-resident table streams faster than computing erf (H200, 16K x 16384:
    273 us vs 353-417 for torch's kernel, bench/NOTES.md run 10). `inplace` overwrites x."""
    if not (KERNELS.gelu and x.element_size() == 2 and _runs_triton(x) and x.is_contiguous()):
        return F.gelu(x)
    out = x if inplace else torch.empty_like(x)
    n = x.numel()
    table = _gelu_table(x.device, x.dtype)
    grid = (-(-n // _GELU_BLOCK),)
    _triton()[2][grid](x.view(torch.int16), out.view(torch.int16), table, n, BLOCK=_GELU_BLOCK, num_warps=4)
    return out


@functools.cache
def _gelu_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """F.gelu of every 16-bit pattern of `dtype`, indexed by the pattern (as int16 bits)."""
    every = torch.arange(1 << 16, device=device, dtype=torch.int32).to(torch.int16).view(dtype)
    with torch.inference_mode():
        return F.gelu(every).view(torch.int16)


_KV_BLOCK = 1024


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """k_cache[b, positions[b]] = k[b] and the same for V, for every row b: caches [B, L, H, D], k and v
    [B, H, D] (views into the fused QKV projection are fine: only each row's H * D block must be
    contiguous). One kernel on CUDA with Triton; the two index_put elsewhere."""
    b, h, d = k.shape
    if not (KERNELS.kv_write and _runs_triton(k) and _kv_layout_ok(k_cache, v_cache, k, v)):
        rows = torch.arange(b, device=k.device)
        k_cache[rows, positions] = k  # [B, H, D] scattered to one slot per row
        v_cache[rows, positions] = v
        return
    _launch_kv_write(k, v, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), positions)


def _launch_kv_write(k: torch.Tensor, v: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor, row_stride: int,
                     position_stride: int, positions: torch.Tensor, key_norms: torch.Tensor | None = None,
                     block_size: int = 1) -> None:
    """Row b's H * D values of k and v to row_stride * b + position_stride * positions[b] of k_dst / v_dst
    (and, given key_norms, each head's key norm into block positions[b] // block_size's entry)."""
    b, h, d = k.shape
    n_cols = h * d
    block = max(_KV_BLOCK, d)  # whole heads per program, for the norms
    _triton()[1][(b, -(-n_cols // block))](
        k, v, k.stride(0), k_dst, v_dst, row_stride, position_stride, positions, n_cols,
        key_norms if key_norms is not None else positions, h, block_size, BLOCK=block, HEAD_DIM=d,
        NORMS=key_norms is not None,
    )


def write_kv_slots(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
    *, key_norms: torch.Tensor | None = None, block_size: int = 1,
) -> bool:
    """The paged cache's decode write: k_pool[slots[b]] = k[b] and the same for V, pools flat
    [num_slots, H, D], k and v [B, H, D], slots [B] int32 or int64; with key_norms [num_blocks, H]
    float32, each row's per-head key norm into its block's entry (paged.update_key_norms' rule). One
    kernel (the dense write's, with a row stride of 0, so the slot alone addresses the destination)
    instead of one index_copy_ per pool: a step runs it once per layer. Returns False, writing
    nothing, where the kernel does not apply (no Triton, the kernel switched off, another layout): the
    caller writes instead."""
    d = k.shape[-1]
    if not (KERNELS.kv_write and _runs_triton(k) and k_pool.dtype == k.dtype == v.dtype
            and _kv_layout_ok(k_pool[None], v_pool[None], k, v) and d & (d - 1) == 0
            and (key_norms is None or (key_norms.dtype == torch.float32 and key_norms.is_contiguous()))):
        return False
    _launch_kv_write(k, v, k_pool, v_pool, 0, k_pool.stride(0), slots, key_norms, block_size)
    return True


def _kv_layout_ok(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel addresses each (row, position) slot and each source row as one flat H * D run."""
    h, d = k.shape[1:]

    def flat_heads(t: torch.Tensor, head_dim: int) -> bool:
        return t.stride(-1) == 1 and t.stride(-2) == head_dim

    return (
        k.stride() == v.stride()
        and k_cache.stride() == v_cache.stride()
        and flat_heads(k, d)
        and flat_heads(k_cache, d)
        and k_cache.stride(1) == h * d
    )


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
