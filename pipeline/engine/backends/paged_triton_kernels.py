"""The paged decode attention kernels (Triton), built lazily: see paged_triton.py for what each computes,
how they are launched and what they require. `kernels()` returns (row_partials, prefix_partials), or
None where Triton is missing.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.engine.backends.alibi_window import UNDERFLOW_NATS
from pipeline.engine.triton_lazy import triton_kernels

# A key whose score is below the query's diagonal score by more than this (log2 units) has an exp2
# weight under 2^-150 against the row maximum: 0.0 in float32 (alibi_window.UNDERFLOW_NATS, whose
# one nat of slack covers the rounding of the bound itself)
SKIP_BOUND_LOG2 = -UNDERFLOW_NATS * math.log2(math.e)


@triton_kernels
def kernels(triton: Any, tl: Any) -> Any:
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
