"""Paged decode attention on CUDA: Triton split-K kernels over block tables, with shared-prefix groups.

Two kernels per layer (paged.py's docstring gives the math):

- ``prefix_partials`` (cascade only): one program per (group, row chunk, head, split of the prefix;
  with key norms, of the prefix from its first block some row of the chunk may not skip, so that the
  splits share the keys that are read; every split stores a partial, an empty one if it has no keys).
  The group's queries are stacked as the rows of one tl.dot against each [BLOCK_N, D] K/V tile
  (rows padded to >= 16), so the prefix's K/V are read once per step for the whole group. The bias is
  slope * (j - prefix_len), one value per key; each row's partial max is shifted by
  -slope * (pos - prefix_len) before it is stored, so the merge below sees ordinary ALiBi partials.
- ``row_partials``: one program per (row, head, split) over the row's own keys [start, seq_len)
  (start = its group's prefix_len, else 0; with key norms, from the first block of those it may not
  skip), one query each: scores are tl.sum(q * k) in fp32 with a
  running softmax per key slot, as in splitk.py. The last program of a (row, head) to finish (an atomic
  counter) merges that row's prefix partials and its own by log-sum-exp and writes the output: the one
  place where the parts meet. The prefix kernel ran before it in stream order, so its partials are
  complete.

CUDA-graph safe: grids come from tensor shapes only (rows, heads, table widths, group slots) and a
config; split sizes are computed on the device from each row's length so that a short row (or a
cascade row's 64-key suffix) uses few programs and the rest exit at once; nothing syncs the host.
The counter buffer is shared by every call on a device: calls must run in stream order.
Requirements: pools contiguous [num_blocks, block_size, H, D], block_size a multiple of 16, D a power
of two, prefix_lens multiples of block_size (the prefix kernel reads whole tiles without masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.engine.backends.alibi_window import UNDERFLOW_NATS
from pipeline.engine.metadata import CascadeMeta
from pipeline.engine.triton_lazy import available_on, triton_kernels

MERGE_CHUNK = 32  # partials merged per iteration: [32, D] fp32
# A key whose score is below the query's diagonal score by more than this (log2 units) has an exp2
# weight under 2^-150 against the row maximum: 0.0 in float32 (alibi_window.UNDERFLOW_NATS, whose
# one nat of slack covers the rounding of the bound itself)
SKIP_BOUND_LOG2 = -UNDERFLOW_NATS * math.log2(math.e)


@dataclass(frozen=True)
class PagedConfig:
    block_n: int = 32  # keys per tile of the per-row kernel (halved until it divides block_size)
    target_programs: int = 1024  # per-row kernel: splits per (row, head) = ceil(target / (B * H))
    min_keys: int = 256  # smallest per-row split (fewer partials for short rows)
    num_warps: int = 4
    num_stages: int = 3
    prefix_block_n: int = 64  # keys per tile of the prefix kernel
    # prefix programs for ONE live group (empty group slots exit at once); None: 512 at 16 rows per
    # program, 1024 at 32 (H200, bench/NOTES.md paged runs 1-2: each the faster at its row count)
    prefix_target: int | None = None
    prefix_min_keys: int = 512
    prefix_warps: int = 4
    prefix_stages: int = 3
    max_rows: int = 32  # group rows per prefix program (a power of two >= 16); more rows: row chunks
    skip_scan: int = 64  # block norms read per iteration of the skip scan (a power of two)


DEFAULT = PagedConfig()


def is_available(device: torch.device) -> bool:
    return available_on(device, _kernels)


@triton_kernels
def _kernels(triton: Any, tl: Any) -> Any:
    globals()["SKIP_BOUND"] = tl.constexpr(SKIP_BOUND_LOG2)
    @triton.jit
    def merge_row(
        m_ptr, l_ptr, acc_ptr, out_ptr, bh, b, h, n_pref, prefix_splits, n_own, n_slots, stride_ob,
        HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
    ):
        # slots [0, n_pref) hold the prefix kernel's partials, [prefix_splits, + n_own) the row's own.
        # .cg loads: the own partials were just written by other programs (L2, not L1)
        c = tl.arange(0, CHUNK)
        d = tl.arange(0, HEAD_DIM)
        total = n_pref + n_own
        m_run = -float("inf")
        l_sum = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for first in range(0, total, CHUNK):
            i = first + c
            live = i < total
            part = bh * n_slots + tl.where(i < n_pref, i, prefix_splits + i - n_pref)
            m_c = tl.load(m_ptr + part, mask=live, other=-float("inf"), cache_modifier=".cg")
            l_c = tl.load(l_ptr + part, mask=live, other=0.0, cache_modifier=".cg")
            acc_c = tl.load(acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None],
                            other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m_c, axis=0))
            m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)  # an empty own part is -inf: no NaN
            w = tl.exp2(m_c - m_ref)
            rescale = tl.exp2(m_run - m_ref)
            l_sum = l_sum * rescale + tl.sum(w * l_c, axis=0)
            acc = acc * rescale + tl.sum(w[:, None] * acc_c, axis=0)
            m_run = m_new
        out = acc / l_sum
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    globals()["merge_row"] = merge_row  # jitted callees are looked up in module globals

    @triton.jit
    def first_kept_block(
        kn_ptr, table, h, H, first, stop, qn, s_diag, last, slope_log2,
        ROWS_SHAPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, SCAN: tl.constexpr,
    ):
        # the lowest block index in [first, stop) that some query may not skip (stop when none):
        # block i is skipped when, for every query, qn * max|k| - slope * (distance to its nearest key)
        # - s_diag < SKIP_BOUND (qn, s_diag, last: per query, [ROWS] with ROWS_SHAPE, else scalars; log2 units)
        kept = stop
        for c in range(first, stop, SCAN):
            i = c + tl.arange(0, SCAN)
            live = i < stop
            blk = tl.load(table + i, mask=live, other=0).to(tl.int64)
            kn = tl.load(kn_ptr + blk * H + h, mask=live, other=0.0)  # [SCAN] max key norm of block i
            near = (i + 1) * BLOCK_SIZE - 1  # the block's last key: the nearest to every query after it
            if ROWS_SHAPE:
                dist = tl.maximum(last[:, None] - near[None, :], 0).to(tl.float32)  # [ROWS, SCAN]
                bound = qn[:, None] * kn[None, :] - slope_log2 * dist - s_diag[:, None]
                bound = tl.max(bound, axis=0)  # [SCAN]: the query that needs the block most
            else:
                dist = tl.maximum(last - near, 0).to(tl.float32)
                bound = qn * kn - slope_log2 * dist - s_diag
            keep = live & ((bound >= SKIP_BOUND) | (bound != bound))  # noqa: F821 (set in _kernels); a NaN bound keeps its block
            kept = tl.minimum(kept, tl.min(tl.where(keep, i, stop), axis=0))
        return kept

    globals()["first_kept_block"] = first_kept_block

    @triton.jit
    def row_partials(
        q_ptr, k_ptr, v_ptr, slopes_ptr, seq_lens_ptr, bt_ptr, row_group_ptr, plen_ptr, kn_ptr,
        m_ptr, l_ptr, acc_ptr, out_ptr, count_ptr,
        stride_qb, stride_kblk, stride_ktok, stride_bt, stride_ob, H, n_splits, min_keys,
        n_slots, prefix_splits, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_STAGES: tl.constexpr,
        CASCADE: tl.constexpr, CHUNK: tl.constexpr, SKIP: tl.constexpr,
        SCAN: tl.constexpr,
    ):
        bh = tl.program_id(0)  # b * H + h
        split = tl.program_id(1)
        b, h = bh // H, bh % H
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * HEAD_DIM + d).to(tl.float32) * qk_scale_log2
        slope_log2 = tl.load(slopes_ptr + h) * 1.4426950408889634  # scores in log2 units: exp2 below
        n = tl.load(seq_lens_ptr + b).to(tl.int32)
        start = n * 0
        if CASCADE:
            g = tl.load(row_group_ptr + b)
            p_len = tl.load(plen_ptr + tl.maximum(g, 0)).to(tl.int32)
            start = tl.where(g >= 0, p_len, 0)
        table = bt_ptr + b.to(tl.int64) * stride_bt
        if SKIP:  # start at the first block of this row's own keys that it may not skip
            last = n - 1
            blk_last = tl.load(table + last // BLOCK_SIZE).to(tl.int64)
            k_diag = tl.load(k_ptr + blk_last * stride_kblk + (last % BLOCK_SIZE).to(tl.int64) * stride_ktok
                             + h * HEAD_DIM + d).to(tl.float32)
            kept = first_kept_block(kn_ptr, table, h, H, start // BLOCK_SIZE, tl.cdiv(n, BLOCK_SIZE),
                                    tl.sqrt(tl.sum(q * q, axis=0)), tl.sum(q * k_diag, axis=0), last, slope_log2,
                                    False, BLOCK_SIZE, SCAN)
            start = tl.maximum(start, kept * BLOCK_SIZE)
        own = n - start
        # split size from this row's length: n_splits programs at most, min_keys keys at least
        kps = tl.maximum(min_keys, tl.cdiv(tl.cdiv(own, n_splits), BLOCK_N) * BLOCK_N)
        n_live = tl.maximum(tl.cdiv(own, kps), 1)  # >= 1: an empty own part still merges the prefix
        if split < n_live:
            lo = start + split * kps
            hi = tl.minimum(lo + kps, n)
            jn = tl.arange(0, BLOCK_N)
            m_slot = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
            l_slot = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_slot = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
            for t in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
                # a tile never crosses a block: start is a multiple of BLOCK_SIZE, kps of BLOCK_N
                blk = tl.load(table + t // BLOCK_SIZE).to(tl.int64)
                j = t + jn
                valid = j < hi
                offs = (blk * stride_kblk + ((t % BLOCK_SIZE) + jn).to(tl.int64)[:, None] * stride_ktok
                        + h * HEAD_DIM + d[None, :])  # [BLOCK_N, HEAD_DIM]
                k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
                v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                # distance to the query (n - 1), not j: near keys keep full fp32 precision
                s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) + slope_log2 * (j - (n - 1)).to(tl.float32)
                s = tl.where(valid, s, -float("inf"))  # [BLOCK_N]
                m_new = tl.maximum(m_slot, s)
                m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)
                p = tl.exp2(s - m_ref)
                rescale = tl.exp2(m_slot - m_ref)
                acc_slot = acc_slot * rescale[:, None] + p[:, None] * v
                l_slot = l_slot * rescale + p
                m_slot = m_new
            m = tl.max(m_slot, axis=0)
            w = tl.exp2(m_slot - tl.where(m > -float("inf"), m, 0.0))  # slots that saw no key weigh 0
            l_sum = tl.sum(w * l_slot, axis=0)
            acc = tl.sum(w[:, None] * acc_slot, axis=0)
            part = bh * n_slots + prefix_splits + split
            tl.store(m_ptr + part, m)
            tl.store(l_ptr + part, l_sum)
            tl.store(acc_ptr + part.to(tl.int64) * HEAD_DIM + d, acc)
            tl.debug_barrier()  # every thread's partial stores precede the (acq_rel, gpu) atomic
            done = tl.atomic_add(count_ptr + bh, 1)
            if done == n_live - 1:
                n_pref = start * 0
                if CASCADE:  # every prefix split of a live group stored a partial (maybe empty)
                    n_pref = tl.where((g >= 0) & (p_len > 0), prefix_splits, 0)
                merge_row(m_ptr, l_ptr, acc_ptr, out_ptr, bh, b, h, n_pref, prefix_splits, n_live, n_slots,
                          stride_ob, HEAD_DIM, CHUNK)
                tl.store(count_ptr + bh, 0)  # ready for the next call (next layer, graph replay)

    @triton.jit
    def prefix_partials(
        q_ptr, k_ptr, v_ptr, slopes_ptr, seq_lens_ptr, ptab_ptr, plen_ptr, grows_ptr, bt_ptr, kn_ptr,
        m_ptr, l_ptr, acc_ptr,
        stride_qb, stride_kblk, stride_ktok, stride_ptab, stride_grows, stride_bt, H, n_chunks, max_group,
        n_splits, min_keys, n_slots, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
        NUM_STAGES: tl.constexpr, PRECISION: tl.constexpr, SKIP: tl.constexpr, SCAN: tl.constexpr,
    ):
        pid = tl.program_id(0)  # (g * n_chunks + chunk) * H + h
        split = tl.program_id(1)
        h = pid % H
        gc = pid // H
        g, chunk = gc // n_chunks, gc % n_chunks
        p_len = tl.load(plen_ptr + g).to(tl.int32)
        if p_len > 0:  # empty group slots read nothing; every split of a live group stores its partials
            d = tl.arange(0, HEAD_DIM)
            r = chunk * ROWS + tl.arange(0, ROWS)
            rows = tl.load(grows_ptr + g.to(tl.int64) * stride_grows + r, mask=r < max_group, other=-1)
            live = rows >= 0
            rows64 = tl.where(live, rows, 0).to(tl.int64)
            slope_log2 = tl.load(slopes_ptr + h) * 1.4426950408889634
            table = ptab_ptr + g.to(tl.int64) * stride_ptab
            jn = tl.arange(0, BLOCK_N)
            m = tl.full([ROWS], -float("inf"), dtype=tl.float32)
            l_sum = tl.zeros([ROWS], dtype=tl.float32)
            q = tl.load(q_ptr + rows64[:, None] * stride_qb + h * HEAD_DIM + d[None, :], mask=live[:, None],
                        other=0.0)  # [ROWS, HEAD_DIM] in q's dtype: the tensor-core operand
            acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
            n_r = tl.load(seq_lens_ptr + rows64, mask=live, other=1).to(tl.int32)
            first = p_len * 0
            if SKIP:  # the splits share the prefix from the first block some row of this chunk may not skip
                last = n_r - 1
                blk_last = tl.load(bt_ptr + rows64 * stride_bt + last // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
                k_diag = tl.load(k_ptr + blk_last[:, None] * stride_kblk
                                 + (last % BLOCK_SIZE).to(tl.int64)[:, None] * stride_ktok + h * HEAD_DIM + d[None, :],
                                 mask=live[:, None], other=0.0).to(tl.float32)  # [ROWS, HEAD_DIM]
                qf = q.to(tl.float32)
                qn = tl.sqrt(tl.sum(qf * qf, axis=1)) * qk_scale_log2
                s_diag = tl.where(live, tl.sum(qf * k_diag, axis=1) * qk_scale_log2, float("inf"))  # dead rows keep nothing
                kept = first_kept_block(kn_ptr, table, h, H, 0, p_len // BLOCK_SIZE, qn, s_diag, last,
                                        slope_log2, True, BLOCK_SIZE, SCAN)
                first = kept * BLOCK_SIZE
            kps = tl.maximum(min_keys, tl.cdiv(tl.cdiv(p_len - first, n_splits), BLOCK_N) * BLOCK_N)
            lo = first + split * kps
            hi = tl.minimum(lo + kps, p_len)  # lo >= hi: an empty partial (max -inf, sum 0)
            for t in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
                blk = tl.load(table + t // BLOCK_SIZE).to(tl.int64)
                offs = (blk * stride_kblk + ((t % BLOCK_SIZE) + jn).to(tl.int64)[:, None] * stride_ktok
                        + h * HEAD_DIM + d[None, :])  # [BLOCK_N, HEAD_DIM]: whole tiles, no mask
                k = tl.load(k_ptr + offs)
                v = tl.load(v_ptr + offs)
                # key-only ALiBi, relative to the prefix end: near keys' biases stay near 0
                bias = slope_log2 * (t + jn - p_len).to(tl.float32)  # [BLOCK_N]
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2 + bias[None, :]
                m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds BLOCK_N real keys
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])  # [ROWS, BLOCK_N]
                l_sum = l_sum * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m = m_new
            m_row = m - slope_log2 * (n_r - 1 - p_len).to(tl.float32)  # restore -slope * (pos - P)
            part = (rows64 * H + h) * n_slots + split  # [ROWS]
            tl.store(m_ptr + part, m_row, mask=live)
            tl.store(l_ptr + part, l_sum, mask=live)
            tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=live[:, None])

    return row_partials, prefix_partials


_counters: dict[torch.device, torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []  # outgrown buffers, kept alive for graphs captured with them


def _counter(device: torch.device, n: int) -> torch.Tensor:
    """Per-(row, head) arrival counters, zero between calls (the merging program resets its own)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:  # a captured CUDA graph may still point at it: never free it
            _retired_counters.append(buf)
        buf = _counters[device] = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return buf


def _tile(block_n: int, block_size: int) -> int:
    while block_size % block_n:
        block_n //= 2
    return block_n


def grid_sizes(b: int, h: int, max_keys: int, groups: int, group_width: int, max_prefix_keys: int,
               cfg: PagedConfig) -> dict[str, int]:
    """Shapes only: splits per (row, head), prefix splits per (group, chunk, head), row chunks."""
    rows = min(cfg.max_rows, max(16, 1 << (max(group_width, 1) - 1).bit_length()))
    chunks = -(-group_width // rows) if groups else 0
    splits = max(1, min(-(-cfg.target_programs // (b * h)), -(-max_keys // cfg.min_keys)))
    target = cfg.prefix_target or (512 if rows <= 16 else 1024)
    prefix = max(1, min(-(-target // (h * max(chunks, 1))), -(-max_prefix_keys // cfg.prefix_min_keys)))
    return {"splits": splits, "prefix_splits": prefix if groups else 0, "rows": rows, "chunks": chunks}


def decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float,
    cascade: CascadeMeta | None = None,
    key_norms: torch.Tensor | None = None,
    config: PagedConfig | None = None,
) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D] (see paged.decode). `key_norms` [num_blocks, H] float32 (each block's
    largest key norm per head; paged.py's docstring, "Exact skipping"): blocks of keys whose weights are
    exactly 0.0 for every query reading them are not read. `config` overrides DEFAULT (benchmarks)."""
    row_partials, prefix_partials = _kernels()
    cfg = config or DEFAULT
    b, h, d = q.shape
    bs = k_pool.shape[1]
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()) or k_pool.shape != v_pool.shape:
        raise ValueError("paged decode needs contiguous K/V pools of one shape [blocks, block_size, H, D]")
    if q.stride(-1) != 1 or q.stride(-2) != d or bs % 16 or d & (d - 1):
        raise ValueError(f"paged decode needs [B, H, D] queries, block_size % 16 == 0, D a power of 2 ({bs}, {d})")
    if cfg.min_keys % cfg.block_n or cfg.prefix_min_keys % cfg.prefix_block_n:
        raise ValueError(f"bad paged config {cfg}")
    block_n, prefix_block_n = _tile(cfg.block_n, bs), _tile(cfg.prefix_block_n, bs)
    groups = cascade.prefix_lens.shape[0] if cascade is not None else 0
    width = cascade.group_rows.shape[1] if cascade is not None else 0
    max_prefix = cascade.prefix_block_tables.shape[1] * bs if cascade is not None else 0
    sizes = grid_sizes(b, h, block_tables.shape[1] * bs, groups, width, max_prefix, cfg)
    n_slots = sizes["prefix_splits"] + sizes["splits"]
    m = torch.empty(b * h, n_slots, device=q.device, dtype=torch.float32)  # [B * H, slots]
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * h, n_slots, d, device=q.device, dtype=torch.float32)  # [B * H, slots, D]
    out = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    slopes32 = slopes.to(device=q.device, dtype=torch.float32)
    qk_scale_log2 = scale * math.log2(math.e)
    strides = (k_pool.stride(0), k_pool.stride(1))
    skip = key_norms is not None
    if skip and (key_norms.shape != (k_pool.shape[0], h) or key_norms.dtype != torch.float32
                 or not key_norms.is_contiguous()):
        raise ValueError(f"key_norms must be contiguous float32 [num_blocks, H], got {tuple(key_norms.shape)}")
    norms = key_norms if skip else seq_lens  # unread without SKIP
    if cascade is not None and groups:
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        prefix_partials[(groups * sizes["chunks"] * h, sizes["prefix_splits"])](
            q, k_pool, v_pool, slopes32, seq_lens, cascade.prefix_block_tables, cascade.prefix_lens,
            cascade.group_rows, block_tables, norms, m, l_sum, acc,
            q.stride(0), *strides, cascade.prefix_block_tables.stride(0), cascade.group_rows.stride(0),
            block_tables.stride(0), h, sizes["chunks"], width, sizes["prefix_splits"], cfg.prefix_min_keys, n_slots,
            qk_scale_log2,
            HEAD_DIM=d, BLOCK_N=prefix_block_n, BLOCK_SIZE=bs, ROWS=sizes["rows"], NUM_STAGES=cfg.prefix_stages,
            PRECISION=precision, SKIP=skip, SCAN=cfg.skip_scan, num_warps=cfg.prefix_warps,
        )
    row_group = cascade.row_group if cascade is not None else seq_lens  # unread without CASCADE
    plen = cascade.prefix_lens if cascade is not None else seq_lens
    row_partials[(b * h, sizes["splits"])](
        q, k_pool, v_pool, slopes32, seq_lens, block_tables, row_group, plen, norms,
        m, l_sum, acc, out, _counter(q.device, b * h),
        q.stride(0), *strides, block_tables.stride(0), out.stride(0), h, sizes["splits"], cfg.min_keys,
        n_slots, sizes["prefix_splits"], qk_scale_log2,
        HEAD_DIM=d, BLOCK_N=block_n, BLOCK_SIZE=bs, NUM_STAGES=cfg.num_stages, CASCADE=bool(groups),
        CHUNK=MERGE_CHUNK, SKIP=skip, SCAN=cfg.skip_scan, num_warps=cfg.num_warps,
    )
    return out
