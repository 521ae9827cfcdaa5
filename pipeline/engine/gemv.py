"""Decode GEMVs with their neighbours fused in (Triton on CUDA): y = residual + W f(x) + bias, where
f is an optional LayerNorm and / or exact GELU of x.

Batch-1 decode reads every weight once per token, so each projection is a GEMV bound by weight bytes;
around them the unfused step runs separate add + LayerNorm and GELU kernels and cuBLAS's split-K
reduces, each a launch of a few microseconds (bench/NOTES.md). Here one kernel per projection does it
all: every program owns BLOCK_N output features, recomputes the LayerNorm statistics of x itself (x is
one 4096-vector per row, L2-resident, cheaper than a stats kernel), and streams its rows of W once for
all M <= MAX_ROWS rows of x. A decode layer becomes
    qkv = gemv(x, Wqkv, norm=norm_1); ...; x = gemv(a, out_proj, residual=x)
    u = gemv(x, up_proj, norm=norm_2); x = gemv(u, down_proj, gelu=True, residual=x)

Rounding is the unfused model's: LayerNorm statistics and affine in float32, the normalized x rounded
to x's dtype (F.layer_norm, then F.linear reads it); GELU in float32, rounded (F.gelu on bf16); the
product accumulated in float32 plus the bias, rounded (the linear's output); the residual added in
float32 and rounded once more (`x + linear(...)`). `gemv` falls back to exactly those torch ops where
the kernel cannot run (CPU, torch.compile, no Triton, more rows than KERNELS.gemv_max_rows), so callers can
always call it.

Launch configs come from CONFIGS (filled from bench/gemv_fused.py's H200 sweep), never from
triton.autotune: the call is captured in a CUDA graph, and autotuning with one weight hot in the
50 MB L2 would pick configs that lose once 32 layers' weights stream from HBM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.engine.fused import KERNELS, triton_next_power_of_2
from pipeline.engine.triton_lazy import runs_on, triton_kernels

MAX_ROWS = 8  # rows of x one program keeps in registers; more and a GEMM does better anyway
STATS_ELEMENTS = 4096  # x elements per LayerNorm-statistics load (all rows): one load for MPT-7B at M = 1
_STATS_MIN = 256  # columns per statistics load, at least
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's ROUND codes


@dataclass(frozen=True)
class Norm:
    """LayerNorm applied to x before the product: model.LayerNorm's weight, bias, eps and
    low_precision (which only changes the torch fallback's op order, not the kernel's math: on CUDA
    both compute in float32 and round once)."""

    weight: torch.Tensor  # [K]
    bias: torch.Tensor | None  # [K]
    eps: float
    low_precision: bool = False


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output features per program
    block_k: int  # columns of W per loop step (block_k * element size bytes contiguous per row)
    num_warps: int
    num_stages: int
    prefetch: bool = False  # load W's next tile while the current one is used (H200: slower)


# (N, K) -> config, from bench/gemv_fused.py on the H200 (bf16, M = 1: us per call, share of the
# 4.27 TB/s copy rate; run of 2026-11-28, +-1-2 us between runs). Shapes not listed get default_config's.
CONFIGS: dict[tuple[int, int], GemvConfig] = {
    (12288, 4096): GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=1),  # Wqkv+ln: 27.8 us, 85%
    (4096, 4096): GemvConfig(block_n=4, block_k=1024, num_warps=2, num_stages=1),  # out_proj+res: 10.1 us, 78%
    (16384, 4096): GemvConfig(block_n=8, block_k=512, num_warps=2, num_stages=1),  # up_proj+ln: 35.0 us, 90%
    (4096, 16384): GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=1),  # down+gelu+res: 34.0 us, 92%
    (50432, 4096): GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=1),  # lm_head+ln: 102.0 us, 95%
}


def default_config(n: int, k: int) -> GemvConfig:
    """The sweep's most common winner: 8 features x 1024 columns (2 KB contiguous per row) per step,
    4 features for narrower outputs (more programs to fill 132 SMs)."""
    return GemvConfig(block_n=8 if n >= 8 * 1024 else 4, block_k=min(1024, triton_next_power_of_2(k)),
                      num_warps=4, num_stages=1)


@triton_kernels
def _triton(triton: Any, tl: Any) -> Any:
    """The jitted kernel, or None when Triton is not installed."""

    # Triton resolves a kernel's callees among its module's globals (not a closure's cells), so the
    # helpers are bound there; defined here, not at import, so that importing this module never
    # imports Triton
    global round_to, load_x, load_w

    @triton.jit
    def round_to(x, ROUND: tl.constexpr):
        """float32 x rounded to nearest-even in the activation dtype, kept as float32. bf16 by bit
        arithmetic: Triton's interpreter truncates `.to(tl.bfloat16)`, and this is exact on both."""
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        elif ROUND == 2:
            x = x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        return x

    @triton.jit
    def load_x(
        x_ptr, stride_xm, offs_m, mask_m, offs_k, mask_k, mean, rstd, nw_ptr, nb_ptr,
        NORM: tl.constexpr, NORM_BIAS: tl.constexpr, GELU: tl.constexpr, ROUND: tl.constexpr,
        MASK_K: tl.constexpr,
    ):
        """x[rows, offs_k] after the prologue, float32 [BLOCK_M, BLOCK_K]; 0 where masked."""
        ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        if MASK_K:
            x = tl.load(ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        else:
            x = tl.load(ptrs, mask=mask_m[:, None], other=0.0).to(tl.float32)
        if NORM:
            # masked columns: norm weight and bias load as 0, so they stay 0 (and GELU(0) = 0)
            nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = (x - mean[:, None]) * rstd[:, None] * nw[None, :]
            if NORM_BIAS:
                x += tl.load(nb_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            x = round_to(x, ROUND)
        if GELU:
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
            x = round_to(x, ROUND)
        return x

    @triton.jit
    def load_w(w_rows, offs_k, mask_n, K, MASKED: tl.constexpr):
        """W[rows, offs_k] as [BLOCK_N, BLOCK_K], read once: evict_first keeps x and the residual in L2."""
        ptrs = w_rows + offs_k[None, :]
        if MASKED:
            return tl.load(ptrs, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0,
                           eviction_policy="evict_first")
        return tl.load(ptrs, eviction_policy="evict_first")

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, bias_ptr, nw_ptr, nb_ptr, res_ptr, out_ptr,
        M, N, K, stride_xm, eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STATS_BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr, GELU: tl.constexpr,
        HAS_RES: tl.constexpr, ROUND: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M

        # Triton's num_stages pipelines only loads that feed tl.dot (no change across the H200 sweep);
        # PREFETCH instead loads W's next tile while this one is used, the first before the LayerNorm
        # statistics. It measured slower there (more registers, fewer resident programs): off in CONFIGS.
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # [BLOCK_N, 1] row starts
        if PREFETCH:
            w = load_w(w_rows, tl.arange(0, BLOCK_K), mask_n, K, not (EVEN_N and EVEN_K))

        # LayerNorm statistics of every row, two-pass (mean, then centred variance) as fused.py;
        # one load when a row fits in one STATS_BLOCK
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            if STATS_BLOCK >= K:
                cols = tl.arange(0, STATS_BLOCK)
                live = mask_m[:, None] & (cols < K)[None, :]
                xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=live, other=0.0)
                xs = xs.to(tl.float32)
                mean = tl.sum(xs, axis=1) / K
                centred = tl.where(live, xs - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / K + eps)
            else:
                total = tl.zeros([BLOCK_M], dtype=tl.float32)
                for k0 in range(0, K, STATS_BLOCK):
                    cols = k0 + tl.arange(0, STATS_BLOCK)
                    xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                                 mask=mask_m[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
                    total += tl.sum(xs, axis=1)
                mean = total / K
                sq = tl.zeros([BLOCK_M], dtype=tl.float32)
                for k0 in range(0, K, STATS_BLOCK):
                    cols = k0 + tl.arange(0, STATS_BLOCK)
                    live = mask_m[:, None] & (cols < K)[None, :]
                    xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=live, other=0.0)
                    centred = tl.where(live, xs.to(tl.float32) - mean[:, None], 0.0)
                    sq += tl.sum(centred * centred, axis=1)
                rstd = tl.rsqrt(sq / K + eps)

        # partial sums per (row, feature, column), reduced once after the loop (no per-step shuffles);
        # one row gets a plain 2-D tile
        if BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            if PREFETCH:
                # past the last tile the mask is all false: nothing is read
                w_next = load_w(w_rows, offs_k + BLOCK_K, mask_n, K, True)
            else:
                w = load_w(w_rows, offs_k, mask_n, K, not (EVEN_N and EVEN_K))
            x = load_x(x_ptr, stride_xm, offs_m, mask_m, offs_k, mask_k, mean, rstd, nw_ptr, nb_ptr,
                       NORM, NORM_BIAS, GELU, ROUND, not EVEN_K)
            if BLOCK_M == 1:
                acc += w.to(tl.float32) * x  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
            else:
                acc += w.to(tl.float32)[None, :, :] * x[:, None, :]  # [BLOCK_M, BLOCK_N, BLOCK_K]
            if PREFETCH:
                w = w_next
        y = tl.sum(acc, axis=1)[None, :] if BLOCK_M == 1 else tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]

        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = round_to(y, ROUND)  # the linear's output
        out_offs = offs_m[:, None] * N + offs_n[None, :]  # out and residual: contiguous [M, N]
        out_mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            y = round_to(y + tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32), ROUND)
        # y holds values exact in the output dtype: this cast rounds nothing
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)

    return gemv_kernel


def _runs_triton(x: torch.Tensor) -> bool:
    return runs_on(x, _triton)


def fusable_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm: Norm | None = None,
    residual: torch.Tensor | None = None,
) -> bool:
    """Whether `gemv(x, weight, ...)` with these operands runs the Triton kernel (else it runs the
    torch fallback): CUDA with Triton outside torch.compile, 1..KERNELS.gemv_max_rows rows, weight row-major
    contiguous [N, K] (nn.Linear's layout; copying it per call would cost more than the GEMV) in x's
    dtype (bf16 / fp16 / fp32), x [..., K] with its last dim contiguous, and bias [N], norm params [K],
    residual [..., N] on x's device, the residual in x's dtype (else `residual + out` would promote)."""
    if not (KERNELS.gemv and _runs_triton(x)) or weight.dim() != 2 or x.dim() == 0:
        return False
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    ok = (
        x.shape[-1] == k > 0
        and weight.is_contiguous()
        and x.dtype == weight.dtype in _ROUNDING
        and x.device == weight.device
        and 1 <= rows <= min(KERNELS.gemv_max_rows, MAX_ROWS)
        and x.stride(-1) == 1
    )
    params = [(bias, n)] + ([] if norm is None else [(norm.weight, k), (norm.bias, k)])
    ok = ok and all(p is None or (p.shape == (size,) and p.device == x.device) for p, size in params)
    if residual is not None:
        ok = ok and residual.shape == (*x.shape[:-1], n) and residual.dtype == x.dtype
        ok = ok and residual.device == x.device
    return ok


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm: Norm | None = None,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """residual + F.linear(f(x), weight, bias) with f = LayerNorm (norm) then exact GELU (gelu), each
    optional: x [..., K], weight [N, K], bias [N], residual [..., N] -> [..., N] in x's dtype.
    One Triton kernel where `fusable_gemv(x, weight)`, else the unfused torch ops. `config` overrides
    the CONFIGS table (the bench's sweep)."""
    if not fusable_gemv(x, weight, bias=bias, norm=norm, residual=residual):
        return gemv_reference(x, weight, bias=bias, norm=norm, gelu=gelu, residual=residual)
    kernel = _triton()
    n, k = weight.shape
    x2 = x.reshape(-1, k)  # [..., K] -> [M, K]
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)  # [M, N]
    res2 = None
    if residual is not None:
        res2 = residual.reshape(m, n).contiguous()  # [..., N] -> [M, N]
    cfg = config or CONFIGS.get((n, k)) or default_config(n, k)
    block_m = triton_next_power_of_2(m)
    # rows share the partial-sum registers: fewer columns per step as rows grow
    block_n, block_k = cfg.block_n, cfg.block_k if block_m == 1 else max(32, cfg.block_k // block_m)
    stats_block = min(triton_next_power_of_2(k), max(_STATS_MIN, STATS_ELEMENTS // block_m))
    nw = nb = bias_c = None
    if norm is not None:
        nw = norm.weight.contiguous()
        nb = None if norm.bias is None else norm.bias.contiguous()
    if bias is not None:
        bias_c = bias.contiguous()
    dummy = x2  # any valid pointer for arguments a constexpr flag switches off
    kernel[(-(-n // block_n),)](
        x2, weight, _or(bias_c, dummy), _or(nw, dummy), _or(nb, dummy), _or(res2, dummy), out,
        m, n, k, x2.stride(0), float(norm.eps) if norm is not None else 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STATS_BLOCK=stats_block,
        HAS_BIAS=bias is not None, NORM=norm is not None, NORM_BIAS=nb is not None, GELU=gelu,
        HAS_RES=residual is not None, ROUND=_ROUNDING[x.dtype],
        EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0, PREFETCH=cfg.prefetch,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.reshape(*x.shape[:-1], n)  # [M, N] -> [..., N]


def _or(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t


def gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm: Norm | None = None,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused ops the model runs today (model.LayerNorm.forward, F.gelu, nn.Linear, `x + y`)."""
    h = x
    if norm is not None:
        dim = (x.shape[-1],)
        if norm.low_precision:
            h = F.layer_norm(h, dim, norm.weight, norm.bias, norm.eps)
        else:
            nb = None if norm.bias is None else norm.bias.float()
            h = F.layer_norm(h.float(), dim, norm.weight.float(), nb, norm.eps).to(x.dtype)
    if gelu:
        h = F.gelu(h)
    out = F.linear(h, weight, bias)
    return out if residual is None else residual + out
