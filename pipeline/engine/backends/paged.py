"""Decode attention over a paged KV cache, with shared-prefix ("cascade") groups; ALiBi, causal.

Layout (pipeline/engine/paged_cache.py owns it): per layer, K and V pools [num_blocks, block_size, H, D]
(contiguous); a sequence's key j lives at pool[block_table[j // block_size], j % block_size].

``decode(q [B, H, D], k_pool, v_pool, block_tables [B, max_blocks] int32, seq_lens [B] int32, slopes [H],
*, scale, cascade=None) -> [B, H, D]``: row b's query sits at position seq_lens[b] - 1 and sees keys
j < seq_lens[b] with score scale * q.k - slope_h * (pos - j).

Cascade: rows of group g share their first prefix_lens[g] keys (a multiple of block_size: the same
physical blocks, prefix_block_tables[g]). That prefix is attended once per (group, head) for all the
group's queries together, with a bias of the key alone, slope * (j - prefix_len): for one query,
ALiBi's -slope * pos term is the same for every key, so it cancels in the softmax; it only shifts the
part's log-sum-exp, by -slope * (pos - prefix_len), which is added back before the prefix part is
merged with the row's own keys [prefix_len, seq_len) by log-sum-exp. The bias is taken relative to
the prefix END (not key 0) so the keys that matter, the near ones, keep biases near 0 in float32.

Exact skipping (key_norms [num_blocks, H] float32, each block's largest key norm per head, kept by the
cache's writes: `write`, `update_key_norms`): with ALiBi the row maximum is at least the diagonal
score s_ii = scale * q . k_i (the query's own key, always seen), so a key d positions back weighs at
most exp(scale * |q| * max|k| - slope * d - s_ii) against it; when that is below exp(-UNDERFLOW_NATS)
for every query that reads a block (alibi_window.py: the float32 exp2 a kernel computes is 0.0 there),
the block adds nothing to any output and the Triton kernels start past it. The bound uses each
query's own norm and each block's own keys, so it holds for any checkpoint; for a steep head at a long
context most of the K/V a decode step reads is such blocks.

On CUDA the Triton kernels in paged_triton.py run (CUDA-graph safe); elsewhere the torch code below:
blocks gathered a chunk of keys at a time, float32 scores, exact log-sum-exp merges (it reads every
key: skipping changes no result, only the bytes read).
"""

from __future__ import annotations

import math

import torch

from pipeline.engine import fused
from pipeline.engine.metadata import CascadeMeta

__all__ = ["CascadeMeta", "decode", "gather", "update_key_norms", "write"]

CHUNK_KEYS = 2048  # keys per gathered chunk in the torch path: [B, CHUNK_KEYS, H, D] at most


def _use_triton(q: torch.Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    from pipeline.engine.backends import paged_triton

    return paged_triton.is_available(q.device)


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
) -> torch.Tensor:
    """One decode step's attention for every row (see the module docstring). out [B, H, D], q's dtype.
    `key_norms` (exact skipping) is used by the Triton kernels; the torch path reads every key."""
    if _use_triton(q):
        from pipeline.engine.backends import paged_triton

        return paged_triton.decode(q, k_pool, v_pool, block_tables, seq_lens, slopes, scale=scale, cascade=cascade,
                                   key_norms=key_norms)
    return torch_decode(q, k_pool, v_pool, block_tables, seq_lens, slopes, scale=scale, cascade=cascade)


# --- torch path ----------------------------------------------------------------------------------------


def _online(
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    scores: torch.Tensor,
    values: torch.Tensor,
    equation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one chunk of float32 scores [..., keys] (-inf = masked) into a running (max, sum, acc).
    A query whose keys are all masked so far keeps max -inf and sum 0 (no NaN)."""
    m_c = scores.amax(dim=-1)
    if state is not None:
        m_c = torch.maximum(m_c, state[0])
    m_ref = torch.where(torch.isfinite(m_c), m_c, torch.zeros_like(m_c))
    p = torch.exp(scores - m_ref[..., None])
    acc_c = torch.einsum(equation, p, values)
    l_c = p.sum(dim=-1)
    if state is None:
        return m_c, l_c, acc_c
    m, l_sum, acc = state
    rescale = torch.exp(m - m_ref)
    return m_c, l_sum * rescale + l_c, acc * rescale[..., None] + acc_c


def _finish(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum, acc) -> normalized output and log-sum-exp (-inf, output 0 where nothing was seen)."""
    m, l_sum, acc = state
    seen = l_sum > 0
    out = acc / torch.where(seen, l_sum, torch.ones_like(l_sum))[..., None]
    lse = torch.where(seen, m + torch.log(torch.where(seen, l_sum, torch.ones_like(l_sum))), -math.inf)
    return out, lse


def _gather_keys(pool: torch.Tensor, tables: torch.Tensor, first_block: int, last_block: int) -> torch.Tensor:
    """tables [N, max_blocks] -> pool rows of blocks [first_block, last_block) as [N, keys, H, D] float32."""
    ids = tables[:, first_block:last_block].long()  # [N, nb]
    blocks = pool[ids]  # [N, nb, block_size, H, D]
    return blocks.flatten(1, 2).float()  # [N, nb * block_size, H, D]


def _own_part(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    start: torch.Tensor, n: torch.Tensor, slope: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row over its keys [start[b], n[b]) with ordinary ALiBi: out [B, H, D], lse [B, H] float32."""
    bs = k_pool.shape[1]
    lo, hi = int(start.min()), int(n.max())  # host values: this path serves CPU, not CUDA graphs
    per_chunk = max(1, CHUNK_KEYS // bs)
    qf = q.float()
    pos = (n - 1).float()[:, None, None]  # [B, 1, 1]
    state = None
    end_block = -(-hi // bs)
    for b0 in range(lo // bs, end_block, per_chunk):
        b1 = min(b0 + per_chunk, end_block)
        k, v = _gather_keys(k_pool, block_tables, b0, b1), _gather_keys(v_pool, block_tables, b0, b1)
        j = torch.arange(b0 * bs, b1 * bs, device=q.device)  # [keys]
        valid = (j[None, :] >= start[:, None]) & (j[None, :] < n[:, None])  # [B, keys]
        scores = scale * torch.einsum("bhd,bkhd->bhk", qf, k) - slope[None, :, None] * (pos - j.float())
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)  # [B, H, keys]
        v = v.masked_fill(~valid[:, :, None, None], 0.0)  # stale slots may hold anything, NaN too: 0 * NaN
        state = _online(state, scores, v, "bhk,bkhd->bhd")
    if state is None:  # every row empty (cannot happen with seq_lens >= 1, kept for safety)
        b, h, d = q.shape
        return q.new_zeros(b, h, d, dtype=torch.float32), q.new_full((b, h), -math.inf, dtype=torch.float32)
    return _finish(state)


def _prefix_part(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cascade: CascadeMeta,
    n: torch.Tensor, slope: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's queries stacked against its prefix with the key-only bias slope * (j - P), then
    scattered back to rows with the query-position term restored: out [B, H, D], lse [B, H] (-inf for
    rows in no group)."""
    b, h, d = q.shape
    bs = k_pool.shape[1]
    plen = cascade.prefix_lens.long()  # [G]
    rows = cascade.group_rows.long()  # [G, R]
    live = (rows >= 0) & (plen[:, None] > 0)  # [G, R]
    qg = q.float()[rows.clamp(min=0)]  # [G, R, H, D]
    state = None
    per_chunk = max(1, CHUNK_KEYS // bs)
    end_block = -(-int(plen.max()) // bs)
    for b0 in range(0, end_block, per_chunk):
        b1 = min(b0 + per_chunk, end_block)
        k = _gather_keys(k_pool, cascade.prefix_block_tables, b0, b1)  # [G, keys, H, D]
        v = _gather_keys(v_pool, cascade.prefix_block_tables, b0, b1)
        j = torch.arange(b0 * bs, b1 * bs, device=q.device)
        rel = (j[None, :] - plen[:, None]).float()  # [G, keys], < 0 inside the prefix
        outside = rel >= 0  # [G, keys]: past a group's prefix (table padding of shorter prefixes)
        bias = (slope[None, :, None] * rel[:, None, :]).masked_fill(outside[:, None, :], -math.inf)
        scores = scale * torch.einsum("grhd,gkhd->ghrk", qg, k) + bias[:, :, None, :]  # [G, H, R, keys]
        scores = scores.masked_fill(outside[:, None, None, :], -math.inf)  # NaN keys too
        v = v.masked_fill(outside[:, :, None, None], 0.0)
        state = _online(state, scores, v, "ghrk,gkhd->ghrd")
    out = q.new_zeros(b, h, d, dtype=torch.float32)
    lse = q.new_full((b, h), -math.inf, dtype=torch.float32)
    if state is None:
        return out, lse
    o_g, lse_g = _finish(state)  # [G, H, R, D], [G, H, R]
    g_idx, r_idx = live.nonzero(as_tuple=True)
    row = rows[g_idx, r_idx]  # [N] decode rows that take a prefix part
    shift = slope[None, :] * (n[row] - 1 - plen[g_idx]).float()[:, None]  # [N, H]: -slope * (pos - P)
    out[row] = o_g[g_idx, :, r_idx]
    lse[row] = lse_g[g_idx, :, r_idx] - shift
    return out, lse


def torch_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: float,
    cascade: CascadeMeta | None = None,
) -> torch.Tensor:
    """The reference path (any device; host syncs, so not for CUDA graphs). Scores [B, H, keys] per
    chunk of at most CHUNK_KEYS keys; float32 throughout."""
    slope = slopes.to(device=q.device, dtype=torch.float32)  # [H]
    n = seq_lens.long()
    start = torch.zeros_like(n)
    if cascade is not None:
        g = cascade.row_group.long()
        plen = cascade.prefix_lens.long()[g.clamp(min=0)]
        start = torch.where(g >= 0, plen, start)
    out, lse = _own_part(q, k_pool, v_pool, block_tables, start, n, slope, scale)
    if cascade is not None and bool((start > 0).any()):
        p_out, p_lse = _prefix_part(q, k_pool, v_pool, cascade, n, slope, scale)
        total = torch.logaddexp(lse, p_lse)  # [B, H]: finite, every row has a key
        out = out * torch.exp(lse - total)[..., None] + p_out * torch.exp(p_lse - total)[..., None]
    return out.to(q.dtype)


# --- cache access --------------------------------------------------------------------------------------


def gather(pool: torch.Tensor, block_ids: list[int] | torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) [length, H, D] of one sequence: a view of the pool when its first
    ceil(length / block_size) block ids are consecutive and ascending, else a gathered copy. A tensor
    of ids is read on the host (prefill, not inside a CUDA graph)."""
    bs = pool.shape[1]
    n_blocks = -(-length // bs)
    ids = [int(i) for i in (block_ids.tolist() if isinstance(block_ids, torch.Tensor) else block_ids)][:n_blocks]
    if len(ids) < n_blocks:
        raise ValueError(f"{len(ids)} blocks cannot hold {length} keys of {bs} per block")
    if n_blocks == 0:
        return pool.new_empty(0, *pool.shape[2:])
    first = ids[0]
    if ids == list(range(first, first + n_blocks)):
        return pool[first : first + n_blocks].flatten(0, 1)[:length]  # view: [n_blocks * bs, H, D]
    index = torch.tensor(ids, dtype=torch.long, device=pool.device)
    return pool.index_select(0, index).flatten(0, 1)[:length]  # [n_blocks * bs, H, D] copy


def write(
    pool_k: torch.Tensor, pool_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    key_norms: torch.Tensor | None = None,
) -> None:
    """k, v [N, H, D] into slots slot_mapping [N] int32 or int64 (block * block_size + offset) of the
    flat [num_blocks * block_size, H, D] views, one slot per block at most (a decode step's rows), and
    each written block's key norms updated (`update_key_norms`): one fused kernel on CUDA, else
    index_copy_ per pool (no host sync either way: CUDA-graph safe)."""
    flat_k = pool_k.view(-1, *pool_k.shape[2:])  # [blocks * bs, H, D]; .view raises if not a view
    flat_v = pool_v.view(-1, *pool_v.shape[2:])
    if fused.write_kv_slots(flat_k, flat_v, k, v, slot_mapping, key_norms=key_norms, block_size=pool_k.shape[1]):
        return
    slots = slot_mapping.long()
    stored = k.to(pool_k.dtype)  # the keys as the pool holds them: their norms are the bound's
    flat_k.index_copy_(0, slots, stored)
    flat_v.index_copy_(0, slots, v.to(pool_v.dtype))
    if key_norms is not None:
        bs = pool_k.shape[1]
        blocks = slots // bs
        scratch = torch.full_like(blocks, key_norms.shape[0] - 1)  # its norms mean nothing: a harmless reset
        update_key_norms(key_norms, stored, blocks, torch.where(slots % bs == 0, blocks, scratch))


def update_key_norms(key_norms: torch.Tensor, k: torch.Tensor, blocks: torch.Tensor, fresh: torch.Tensor) -> None:
    """key_norms [num_blocks, H] after keys k [N, H, D] (as stored) went into blocks `blocks` [N] (int64):
    the blocks in `fresh` (int64; those whose first slot was among the writes) restart from these keys
    alone, whatever they held before, the others take the max with what they have. No host sync."""
    norms = torch.linalg.vector_norm(k.float(), dim=-1)  # [N, H]
    key_norms.index_fill_(0, fresh, 0.0)  # norms are >= 0: 0 is "no key yet"
    key_norms.scatter_reduce_(0, blocks[:, None].expand_as(norms), norms, reduce="amax", include_self=True)
