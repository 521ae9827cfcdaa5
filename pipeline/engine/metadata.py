"""Attention metadata: where one forward's tokens sit in the KV cache.

The model never indexes the cache itself: each block hands its new K/V and its queries to the layer
cache (pipeline/engine/cache.py for dense rows, paged_cache.py for blocks) together with one of
these objects, and the cache decides how K/V are written and read. So only the caches know the
layout; a backend kernel sees tensors the cache prepared for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PrefillMeta:
    """One chunk of `num_tokens` positions starting at `start`, for the cache rows `rows` (dense
    caches) or one sequence's block table `block_ids` (paged caches; it covers start + num_tokens)."""

    start: int
    num_tokens: int
    rows: slice = field(default_factory=lambda: slice(0, 1))
    block_ids: tuple[int, ...] | None = None
    # the same ids on the device (int64), built once per chunk so that no layer copies them there with a
    # host sync (a scattered table's gathers and slot writes)
    block_index: torch.Tensor | None = field(default=None, compare=False)
    # (block of each token, blocks whose first slot the chunk writes) on the device, for the paged cache's
    # key norms (paged_cache.norm_index); built once per chunk, else each layer builds it
    norm_index: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, compare=False)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class CascadeMeta:
    """Decode rows that share the same leading physical blocks (one document): see
    pipeline/engine/backends/paged.py for the kernel side."""

    prefix_block_tables: torch.Tensor  # [G, max_prefix_blocks] int32
    prefix_lens: torch.Tensor  # [G] int32, shared tokens (a multiple of the block size; 0 = unused slot)
    row_group: torch.Tensor  # [B] int32, -1 = the row shares nothing
    group_rows: torch.Tensor  # [G, max_group] int32, -1 padded


@dataclass(frozen=True)
class DecodeMeta:
    """One new token per row: row b's token sits at positions[b]; it sees positions[b] + 1 keys.
    Dense caches need only `positions`; paged ones also the block tables and the slot of each new
    token (block * block_size + offset)."""

    positions: torch.Tensor  # [B] int64 (dense); int32 views of the step's packed inputs (paged)
    seq_lens: torch.Tensor  # [B], positions + 1
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    seq_lens_i32: torch.Tensor | None = None  # [B] int32 (the paged kernels' index type)
    slot_mapping: torch.Tensor | None = None  # [B] int32 or int64
    cascade: CascadeMeta | None = None

    @classmethod
    def dense(cls, positions: torch.Tensor) -> DecodeMeta:
        return cls(positions=positions, seq_lens=positions + 1)
