"""Paged decode attention on CUDA: Triton split-K kernels over block tables, with shared-prefix groups.

Two kernels per layer (built in paged_triton_kernels.py; paged.py's docstring gives the math):

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

import torch

from pipeline.engine.backends.paged_triton_kernels import kernels as _kernels
from pipeline.engine.metadata import CascadeMeta
from pipeline.engine.triton_lazy import available_on

MERGE_CHUNK = 32  # partials merged per iteration: [32, D] fp32


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
