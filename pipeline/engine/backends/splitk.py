"""Decode attention on CUDA as a Triton split-K (flash-decoding) kernel with ALiBi inline (no bias row).

Batch-1 decode has one query per head, so the work is reading K and V once at HBM bandwidth. SDPA
needs a bias row built per step and a reduction kernel. Here each (row, head)'s keys are cut into
splits of `keys_per_split` keys, one program each; each program loops over BLOCK_N-key tiles,
software-pipelined (`num_stages` tiles of K/V in flight), keeping a running softmax per key slot so
the loop has no cross-warp reduction. One query needs no tensor cores: scores are tl.sum(q * k) in
fp32, the softmax runs in base 2, and ALiBi is one FMA per score. Keys at j >= lengths[b] are never
read (SDPA reads all L and masks); programs whose split starts past lengths[b] exit at once, so the
grid is sized from the cache length alone (CUDA-graph safe).

Each program writes fp32 (max, sum, weighted V) partials; they are merged per head either by a
second small kernel or, with `merge="last"` (the default: one launch per layer), by whichever program
of the head finishes last (an atomic counter per head, reset by that program). The counter buffer is
shared by every call on a device: calls must run in stream order, never concurrently.

Settings come from CONFIGS by cache length (bench/decode_attention.py sweeps them); no autotuning at
call time, so the first call of a shape is the only compile. First in DECODE_ORDER on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.engine.triton_lazy import available_on, triton_kernels

NAME = "splitk"
MERGE_CHUNK = 32  # splits merged per iteration: [32, D] fp32, one L2 round trip for up to 32 splits


@dataclass(frozen=True)
class SplitConfig:
    block_n: int  # keys per inner iteration: [block_n, D] tiles of K and V
    keys_per_split: int  # keys per program, a multiple of block_n
    num_warps: int = 4
    num_stages: int = 3  # tiles of K/V in flight per program (software pipelining)
    merge: str = "last"  # "last": the head's last program merges; "kernel": a second launch
    # online softmax per key slot ([block_n, D] accumulator, folded at the end): no cross-warp
    # reduction per tile; 0-10% faster at 4K and 12% at 65K than one running max per program
    slots: bool = True


# (largest cache length, config), first match wins; the last row catches every longer cache.
# Measured on the H200 (bench/decode_attention.py, 32 distinct caches in one CUDA graph, us/layer incl.
# the merge): 4,160 keys 22.9 (SDPA + bias row 24.2-24.5, floor 16.0; the same grid at lengths = 1
# costs 5.1: launch, prologue and merge); 65,600 keys 247.6 (SDPA 244.9-245.5, floor 251.7).
# The middle row is interpolated, not measured.
CONFIGS: tuple[tuple[int, SplitConfig], ...] = (
    (8192, SplitConfig(block_n=32, keys_per_split=512, num_warps=4, num_stages=4)),
    (32768, SplitConfig(block_n=64, keys_per_split=1024, num_warps=4, num_stages=3)),
    (1 << 62, SplitConfig(block_n=64, keys_per_split=2048, num_warps=4, num_stages=3)),
)


def config_for(length: int) -> SplitConfig:
    return next(cfg for limit, cfg in CONFIGS if length <= limit)


def is_available(device: torch.device) -> bool:
    return available_on(device, _kernels)


@triton_kernels
def _kernels(triton: Any, tl: Any) -> Any:
    @triton.jit
    def merge_head(
        m_ptr, l_ptr, acc_ptr, out_ptr, bh, b, h, n_live, n_splits, stride_ob,
        HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
    ):
        # .cg loads: under merge="last" the partials were just written by other programs (L2, not L1).
        # One pass, rescaling as the maximum grows: a chunk's three loads are one round trip to L2
        base = bh * n_splits
        c = tl.arange(0, CHUNK)
        d = tl.arange(0, HEAD_DIM)
        m_run = -float("inf")
        l_sum = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for first in range(0, n_live, CHUNK):
            live = first + c < n_live
            part = base + first + c
            offs = part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]  # [CHUNK, HEAD_DIM]
            m_c = tl.load(m_ptr + part, mask=live, other=-float("inf"), cache_modifier=".cg")
            l_c = tl.load(l_ptr + part, mask=live, other=0.0, cache_modifier=".cg")
            acc_c = tl.load(acc_ptr + offs, mask=live[:, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m_c, axis=0))  # finite: the first chunk holds split 0
            w = tl.exp2(m_c - m_new)  # 0 for splits past the chunk's end
            rescale = tl.exp2(m_run - m_new)
            l_sum = l_sum * rescale + tl.sum(w * l_c, axis=0)
            acc = acc * rescale + tl.sum(w[:, None] * acc_c, axis=0)
            m_run = m_new
        out = acc / l_sum
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    # the kernels below call merge_head by name, and Triton (compiler and interpreter alike) looks a
    # jitted callee up in the module's globals, not in this closure
    globals()["merge_head"] = merge_head

    @triton.jit
    def partial_attention(
        q_ptr, k_ptr, v_ptr, slopes_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, count_ptr,
        stride_qb, stride_kb, stride_kl, stride_ob, H, keys_per_split, n_splits, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
        SLOTS: tl.constexpr, MERGE_LAST: tl.constexpr, CHUNK: tl.constexpr,
    ):
        bh = tl.program_id(0)  # b * H + h
        split = tl.program_id(1)
        b, h = bh // H, bh % H
        # q and the slope load alongside the length, not after it: one round trip less before K/V
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * HEAD_DIM + d).to(tl.float32) * qk_scale_log2
        slope_log2 = tl.load(slopes_ptr + h) * 1.4426950408889634  # scores in log2 units: exp2 below
        n = tl.load(lengths_ptr + b).to(tl.int32)
        lo = split * keys_per_split
        if lo < n:  # splits past this row's length read nothing and write nothing
            hi = tl.minimum(lo + keys_per_split, n)
            base = b.to(tl.int64) * stride_kb + h * HEAD_DIM
            if SLOTS:  # a running softmax per key slot: no cross-warp reduction inside the loop
                m_slot = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
                l_slot = tl.zeros([BLOCK_N], dtype=tl.float32)
                acc_slot = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
            else:
                m = -float("inf")
                l_sum = 0.0
                acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
            for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
                j = start + tl.arange(0, BLOCK_N)
                valid = j < hi
                offs = base + j.to(tl.int64)[:, None] * stride_kl + d[None, :]  # [BLOCK_N, HEAD_DIM]
                # both loads issued before any math: V's latency hides behind K's reduction
                k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
                v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                # distance to the new token (n - 1), not j: near keys keep full fp32 precision
                s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) + slope_log2 * (j - (n - 1)).to(tl.float32)
                s = tl.where(valid, s, -float("inf"))  # [BLOCK_N]
                if SLOTS:
                    m_new = tl.maximum(m_slot, s)
                    m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)  # a slot with no key yet: no NaN
                    p = tl.exp2(s - m_ref)
                    rescale = tl.exp2(m_slot - m_ref)
                    acc_slot = acc_slot * rescale[:, None] + p[:, None] * v
                    l_slot = l_slot * rescale + p
                    m_slot = m_new
                else:
                    m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: the first tile holds key `lo` < n
                    p = tl.exp2(s - m_new)
                    rescale = tl.exp2(m - m_new)
                    acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
                    l_sum = l_sum * rescale + tl.sum(p, axis=0)
                    m = m_new
            if SLOTS:  # fold the slots into one (max, sum, acc): slots that saw no key weigh 0
                m = tl.max(m_slot, axis=0)
                w = tl.exp2(m_slot - m)
                l_sum = tl.sum(w * l_slot, axis=0)
                acc = tl.sum(w[:, None] * acc_slot, axis=0)
            part = bh * n_splits + split  # partials [B * H, n_splits] (+ [HEAD_DIM])
            tl.store(m_ptr + part, m)
            tl.store(l_ptr + part, l_sum)
            tl.store(acc_ptr + part.to(tl.int64) * HEAD_DIM + d, acc)
            if MERGE_LAST:
                n_live = tl.cdiv(n, keys_per_split)
                tl.debug_barrier()  # every thread's partial stores precede the (acq_rel, gpu) atomic
                done = tl.atomic_add(count_ptr + bh, 1)
                if done == n_live - 1:
                    merge_head(m_ptr, l_ptr, acc_ptr, out_ptr, bh, b, h, n_live, n_splits, stride_ob,
                               HEAD_DIM, CHUNK)
                    tl.store(count_ptr + bh, 0)  # ready for the next call (next layer, graph replay)

    @triton.jit
    def merge_partials(
        m_ptr, l_ptr, acc_ptr, out_ptr, lengths_ptr, stride_ob, H, keys_per_split, n_splits,
        HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        n_live = tl.cdiv(tl.load(lengths_ptr + b).to(tl.int32), keys_per_split)
        merge_head(m_ptr, l_ptr, acc_ptr, out_ptr, bh, b, h, n_live, n_splits, stride_ob,
                   HEAD_DIM, CHUNK)

    return partial_attention, merge_partials


_counters: dict[torch.device, torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []  # outgrown buffers, kept alive for graphs captured with them


def _counter(device: torch.device, n: int) -> torch.Tensor:
    """Per-(row, head) arrival counters, all zero between calls (the merging program resets its own).
    Allocated once per device; under CUDA-graph capture the zero fill is captured and replays too."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:  # a captured CUDA graph may still point at it: never free it
            _retired_counters.append(buf)
        buf = _counters[device] = torch.zeros(max(n, 256), device=device, dtype=torch.int32)
    return buf


def split_count(length: int, cfg: SplitConfig) -> int:
    """Programs per (row, head) for a cache of `length` keys: shapes only, so one captured grid
    serves every step whatever lengths[b] is on the device."""
    return max(1, -(-length // cfg.keys_per_split))


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slopes: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    config: SplitConfig | None = None,
) -> torch.Tensor:
    """q [B, 1, H, D], caches [B, L, H, D] (each row's H * D contiguous), lengths [B] -> [B, 1, H, D].
    `config` overrides the CONFIGS row for L (benchmarks)."""
    if torch.compiler.is_compiling():  # decode_mode="compile": Inductor traces the SDPA path instead
        from pipeline.engine.backends import sdpa

        return sdpa.decode(q, k_cache, v_cache, slopes, lengths, scale=scale)
    partial_attention, merge_partials = _kernels()
    b, length, h, d = k_cache.shape
    if q.stride(-1) != 1 or q.stride(-2) != d or k_cache.stride(-1) != 1 or k_cache.stride(-2) != d:
        raise ValueError("splitk decode needs each row's heads contiguous ([..., H, D] with D innermost)")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("K and V caches must share one layout")
    cfg = config or config_for(length)
    if cfg.keys_per_split % cfg.block_n or cfg.merge not in ("last", "kernel"):
        raise ValueError(f"bad split config {cfg}")
    splits = split_count(length, cfg)
    m = torch.empty(b * h, splits, device=q.device, dtype=torch.float32)  # [B * H, S]
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h, splits, d, device=q.device, dtype=torch.float32)  # [B * H, S, D]
    out = torch.empty(b, 1, h, d, device=q.device, dtype=q.dtype)  # [B, 1, H, D]
    last = cfg.merge == "last"
    count = _counter(q.device, b * h) if last else m  # unused by the kernel when merging separately
    slopes32 = slopes.to(device=q.device, dtype=torch.float32)
    consts = {"HEAD_DIM": d, "CHUNK": MERGE_CHUNK}
    partial_attention[(b * h, splits)](
        q, k_cache, v_cache, slopes32, lengths, m, l_sum, acc, out, count,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), out.stride(0), h, cfg.keys_per_split, splits,
        scale * math.log2(math.e),
        BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages, SLOTS=cfg.slots, MERGE_LAST=last, **consts,
        num_warps=cfg.num_warps,
    )
    if not last:
        merge_partials[(b * h,)](
            m, l_sum, acc, out, lengths, out.stride(0), h, cfg.keys_per_split, splits, **consts, num_warps=4,
        )
    return out
