"""The serving engine's KV cache: one preallocated pool of fixed-size blocks per layer.

K and V are each [n_layers, num_blocks + 1, block_size, H, D]. A sequence's position j lives in
block `block_ids[j // block_size]` at offset j % block_size; which blocks a sequence holds is the
torch-free block pool's business (pipeline/engine/core/block_pool.py). The extra last block is
scratch: padded rows of a captured decode step write there, so they never touch a live block.

Beside them, `key_norms` [n_layers, num_blocks + 1, H] float32: each block's largest key norm per head,
kept by every write, so that decode attention can skip blocks whose ALiBi weights are exactly zero
(backends/paged.py, "Exact skipping"; `skip_decode` switches the skipping off, not the bookkeeping).

Reads and writes go through `PagedLayer`, the layer-cache interface the model uses (see
model.LayerCache). A chunk whose blocks are consecutive ids is written and read as plain slices of
the flat pool (the block pool hands a fresh document ascending ids), so prefill into blocks costs
what prefill into a dense row costs; scattered blocks are gathered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.engine.attention import AttentionBackend
from pipeline.engine.backends import paged
from pipeline.engine.cache import copy_wide
from pipeline.engine.config import MptConfig
from pipeline.engine.metadata import DecodeMeta, PrefillMeta
from pipeline.engine.readback import to_device

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class PoolSize:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def bytes_per_token(config: MptConfig, dtype: torch.dtype) -> int:
    return 2 * config.n_layers * config.d_model * torch.empty((), dtype=dtype).element_size()


def plan_pool(
    config: MptConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    block_size: int,
    max_bytes: int | None,
    reserve_bytes: int,
    min_tokens: int,
) -> PoolSize:
    """How many blocks fit: on CUDA the memory free after the weights minus `reserve_bytes` (prefill
    activations, graphs), capped by `max_bytes`; elsewhere `max_bytes` (required). At least enough
    blocks for `min_tokens` (one full-length sequence), else a clear error."""
    per_block = bytes_per_token(config, dtype) * block_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free - reserve_bytes
        if max_bytes is not None:
            budget = min(budget, max_bytes)
    else:
        if max_bytes is None:
            raise ValueError("a paged KV cache off CUDA needs an explicit size (max_bytes)")
        budget = max_bytes
    num_blocks = max(0, budget // per_block)
    needed = -(-min_tokens // block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV pool fits {num_blocks} blocks of {block_size} tokens ({budget / GIB:.1f} GiB), fewer than "
            f"the {needed} one {min_tokens}-token sequence needs: lower max_seq_len or free memory")
    return PoolSize(int(num_blocks), block_size, per_block)


class PagedKVCache:
    def __init__(self, config: MptConfig, size: PoolSize, *, device: torch.device | str, dtype: torch.dtype) -> None:
        self.size = size
        self.block_size = size.block_size
        self.num_blocks = size.num_blocks
        self.scratch_block = size.num_blocks
        shape = (config.n_layers, size.num_blocks + 1, size.block_size, config.n_heads, config.head_dim)
        # zeros, not empty: a kernel may multiply a masked slot by weight 0, and 0 * NaN garbage is NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_norms = torch.zeros(shape[0], shape[1], shape[3], device=device, dtype=torch.float32)  # [layers, blocks + 1, H]
        # read by each decode step as it is launched; a captured CUDA graph keeps the value it was captured with
        self.skip_decode = True
        log.info("KV pool: %d blocks x %d tokens = %d tokens, %.2f GiB on %s", size.num_blocks,
                 size.block_size, size.tokens, 2 * self.k.numel() * self.k.element_size() / GIB, device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, index: int) -> PagedLayer:
        return PagedLayer(self.k[index], self.v[index], self.key_norms[index], skip_decode=self.skip_decode)

    def check_prefill(self, meta: PrefillMeta) -> None:
        if meta.block_ids is None:
            raise ValueError("a paged cache needs the sequence's block table in PrefillMeta.block_ids")
        if len(meta.block_ids) * self.block_size < meta.end:
            raise ValueError(f"{len(meta.block_ids)} blocks do not cover positions up to {meta.end}")

    def decode_meta(self, positions: torch.Tensor) -> DecodeMeta:
        raise ValueError("a paged cache needs a full DecodeMeta (block tables, slots): see runner.py")


def norm_index(block_ids: tuple[int, ...], start: int, num_tokens: int, block_size: int, scratch: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id of each of the chunk's tokens [T], the blocks whose first slot the chunk writes), int64
    on `device`: what a prefill write's key-norm update needs, the same for every layer (ChunkPrefill
    builds it once per chunk into PrefillMeta.norm_index).
    Where the chunk starts no block, the scratch block stands in (its norms mean nothing)."""
    ids = np.asarray(block_ids, dtype=np.int64)
    pos = np.arange(start, start + num_tokens)
    firsts = np.arange(-(-start // block_size), (start + num_tokens - 1) // block_size + 1)
    fresh = ids[firsts] if len(firsts) else np.asarray([scratch], dtype=np.int64)
    token_blocks = to_device(ids[pos // block_size], device)
    fresh_t = to_device(fresh, device)
    return token_blocks, fresh_t


def consecutive_run(block_ids: tuple[int, ...], first: int, last: int) -> bool:
    """Whether block_ids[first..last] are ascending consecutive ids (one slice of the flat pool)."""
    return block_ids[last] - block_ids[first] == last - first and all(
        block_ids[i + 1] == block_ids[i] + 1 for i in range(first, last))


class PagedLayer:
    """One layer of the pool: K and V [num_blocks + 1, block_size, H, D], key norms [num_blocks + 1, H]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, key_norms: torch.Tensor, *, skip_decode: bool = True) -> None:
        self.k, self.v, self.key_norms = k, v, key_norms
        self.skip_decode = skip_decode
        self.block_size = k.shape[1]
        self.k_flat = k.flatten(0, 1)  # [blocks, block_size, H, D] -> [blocks * block_size, H, D]
        self.v_flat = v.flatten(0, 1)

    def _slots(self, meta: PrefillMeta) -> torch.Tensor:
        bs = self.block_size
        if meta.block_index is not None:  # on the device already: no host sync
            pos = torch.arange(meta.start, meta.end, device=meta.block_index.device)
            return meta.block_index[pos // bs] * bs + pos % bs
        ids = torch.tensor(meta.block_ids, dtype=torch.long)
        pos = torch.arange(meta.start, meta.end)
        return (ids[pos // bs] * bs + pos % bs).to(self.k.device)

    def write_prefill(self, k: torch.Tensor, v: torch.Tensor, meta: PrefillMeta) -> None:
        """k, v [1, T, H, D] of one sequence's chunk at positions [start, end)."""
        assert meta.block_ids is not None
        bs = self.block_size
        first, last = meta.start // bs, (meta.end - 1) // bs
        if consecutive_run(meta.block_ids, first, last):
            lo = meta.block_ids[first] * bs + meta.start % bs
            copy_wide(self.k_flat[lo : lo + meta.num_tokens], k[0])
            copy_wide(self.v_flat[lo : lo + meta.num_tokens], v[0])
        else:
            paged.write(self.k, self.v, k[0], v[0], self._slots(meta))
        token_blocks, fresh = meta.norm_index if meta.norm_index is not None else norm_index(
            meta.block_ids, meta.start, meta.num_tokens, bs, self.key_norms.shape[0] - 1, self.k.device)
        paged.update_key_norms(self.key_norms, k[0], token_blocks, fresh)

    def prefill_kv(self, meta: PrefillMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, end, H, D]: a view when the blocks are consecutive, else gathered."""
        assert meta.block_ids is not None
        n_blocks = -(-meta.end // self.block_size)
        ids = list(meta.block_ids[:n_blocks])
        if meta.block_index is not None and not consecutive_run(meta.block_ids, 0, n_blocks - 1):
            index = meta.block_index[:n_blocks]  # gathered with the ids already on the device
            keys = self.k.index_select(0, index).flatten(0, 1)[: meta.end]  # [end, H, D]
            values = self.v.index_select(0, index).flatten(0, 1)[: meta.end]
            return keys[None], values[None]
        keys = paged.gather(self.k, ids, meta.end)  # [end, H, D]: a view when consecutive
        values = paged.gather(self.v, ids, meta.end)
        return keys[None], values[None]

    def write_decode(self, k: torch.Tensor, v: torch.Tensor, meta: DecodeMeta) -> None:
        """k, v [B, H, D]: row b's new token into slot_mapping[b]."""
        assert meta.slot_mapping is not None
        paged.write(self.k, self.v, k, v, meta.slot_mapping, key_norms=self.key_norms)

    def decode_attention(
        self, q: torch.Tensor, meta: DecodeMeta, backend: AttentionBackend, slopes: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [B, 1, H, D] -> [B, 1, H, D] over each row's blocks (and its shared prefix, if grouped)."""
        assert meta.block_tables is not None and meta.seq_lens_i32 is not None
        out = paged.decode(q[:, 0], self.k, self.v, meta.block_tables, meta.seq_lens_i32, slopes, scale=scale,
                           cascade=meta.cascade, key_norms=self.key_norms if self.skip_decode else None)  # [B, H, D]
        return out[:, None]
