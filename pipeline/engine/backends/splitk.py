"""Decode attention on CUDA as a Triton split-K kernel with ALiBi computed inline (no bias row).

Batch-1 decode has one query per head: SDPA runs one block per (row, head), 32 blocks on a 132-SM
H200, and needs a [B, H, 1, L] bias tensor built per layer (bench/NOTES.md: 0.79 ms of attention at
4,160 keys against a 0.52 ms floor). Here each (row, head)'s keys are cut into `splits` chunks, one
program each, so ~4 programs per SM read K/V at once; each program keeps an online softmax over its
chunk and writes (max, sum, weighted V) partials; a second kernel merges the partials per head.
Keys at j >= lengths[b] are never read (SDPA reads all L and masks), and ALiBi is one FMA per score.

Not in DECODE_ORDER: measured on the H200 (bench/NOTES.md runs 7-9) it is slower than SDPA + bias
row at both lengths (decode step 5.25 vs 4.82 ms at 4K, 19.9 vs 12.05 ms at 65K), so it stays a
bench row (`--split-k-decode`) until it is tuned.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

NAME = "splitk"
BLOCK_N = 64  # keys per inner iteration: [64, 128] bf16 tiles of K and V
PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256  # fewer keys per program and the merge costs more than the split saves


def is_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and _kernels() is not None


@functools.cache
def _kernels() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def partial_attention(
        q_ptr, k_ptr, v_ptr, slopes_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr,
        stride_qb, stride_kb, stride_kl, H, keys_per_split, n_splits, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        bh = tl.program_id(0)  # b * H + h
        split = tl.program_id(1)
        b, h = bh // H, bh % H
        n = tl.load(lengths_ptr + b).to(tl.int32)
        slope_log2 = tl.load(slopes_ptr + h) * 1.4426950408889634  # scores in log2 units: exp2 below
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * HEAD_DIM + d).to(tl.float32) * qk_scale_log2
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, n)
        base = b.to(tl.int64) * stride_kb + h * HEAD_DIM
        m = -float("inf")
        l_sum = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            valid = j < hi
            offs = base + j.to(tl.int64)[:, None] * stride_kl + d[None, :]  # [BLOCK_N, HEAD_DIM]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) - slope_log2 * (n - 1 - j).to(tl.float32)  # [BLOCK_N]
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: the first block holds key `lo` < n
            p = tl.exp2(s - m_new)
            rescale = tl.exp2(m - m_new)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            l_sum = l_sum * rescale + tl.sum(p, axis=0)
            m = m_new
        part = bh * n_splits + split  # partials [B * H, n_splits] (+ [HEAD_DIM])
        tl.store(m_ptr + part, m)  # -inf (and l = 0) for a chunk wholly past the sequence
        tl.store(l_ptr + part, l_sum)
        tl.store(acc_ptr + part.to(tl.int64) * HEAD_DIM + d, acc)

    @triton.jit
    def merge_partials(
        m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, H, n_splits,
        HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        s = tl.arange(0, SPLITS)
        live = s < n_splits
        m = tl.load(m_ptr + bh * n_splits + s, mask=live, other=-float("inf"))
        m_max = tl.max(m, axis=0)  # finite: split 0 always holds key 0
        w = tl.where(m > -float("inf"), tl.exp2(m - m_max), 0.0)  # [SPLITS]
        l_sum = tl.sum(w * tl.load(l_ptr + bh * n_splits + s, mask=live, other=0.0), axis=0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(acc_ptr + (bh * n_splits + s).to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                      mask=live[:, None], other=0.0)  # [SPLITS, HEAD_DIM]
        out = tl.sum(w[:, None] * acc, axis=0) / l_sum
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    return partial_attention, merge_partials


@functools.cache
def _target_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(batch_heads: int, length: int, programs: int) -> tuple[int, int]:
    """(splits, keys per split) for a cache of `length` keys: enough programs to fill the chip
    (`programs` total), never fewer than MIN_KEYS_PER_SPLIT keys each; keys per split a multiple of
    BLOCK_N. Depends only on shapes, so a CUDA graph captures one grid for every step."""
    splits = max(1, min(-(-programs // batch_heads), -(-length // MIN_KEYS_PER_SPLIT)))
    keys = -(-length // splits)
    keys = -(-keys // BLOCK_N) * BLOCK_N
    return -(-length // keys), keys


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slopes: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """q [B, 1, H, D], caches [B, L, H, D] (each row's H * D contiguous), lengths [B] -> [B, 1, H, D]."""
    partial_attention, merge_partials = _kernels()
    b, length, h, d = k_cache.shape
    if q.stride(-1) != 1 or q.stride(-2) != d or k_cache.stride(-1) != 1 or k_cache.stride(-2) != d:
        raise ValueError("splitk decode needs each row's heads contiguous ([..., H, D] with D innermost)")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("K and V caches must share one layout")
    splits, keys = split_plan(b * h, length, _target_programs(q.device))
    m = torch.empty(b * h, splits, device=q.device, dtype=torch.float32)  # [B * H, S]
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h, splits, d, device=q.device, dtype=torch.float32)  # [B * H, S, D]
    slopes32 = slopes.to(device=q.device, dtype=torch.float32)
    partial_attention[(b * h, splits)](
        q, k_cache, v_cache, slopes32, lengths, m, l_sum, acc,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), h, keys, splits, scale * math.log2(math.e),
        HEAD_DIM=d, BLOCK_N=BLOCK_N, num_warps=4,
    )
    out = torch.empty(b, 1, h, d, device=q.device, dtype=q.dtype)  # [B, 1, H, D]
    merge_partials[(b * h,)](
        m, l_sum, acc, out, out.stride(0), h, splits,
        HEAD_DIM=d, SPLITS=max(2, 1 << (splits - 1).bit_length()), num_warps=4,
    )
    return out
