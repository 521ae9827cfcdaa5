"""Dense KV cache: one K and one V tensor [n_layers, B, L_max, H, D], rows = independent sequences.

The single-batch path (`Generator` without the serving engine, `score`, the benchmarks' baselines)
uses it; the serving engine uses the block pool in paged_cache.py. Both hand the model one layer
object with the same four methods (write_prefill / prefill_kv / write_decode / decode_attention), so
the model never indexes a cache itself.
"""

from __future__ import annotations

import torch

from pipeline.engine import fused
from pipeline.engine.attention import AttentionBackend
from pipeline.engine.config import MptConfig
from pipeline.engine.metadata import DecodeMeta, PrefillMeta


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_heads: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch, max_len, n_heads, head_dim)
        # zeros, not empty: masked slots are multiplied by 0 weights, and 0 * NaN garbage would be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @classmethod
    def for_model(
        cls,
        config: MptConfig,
        batch: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        return cls(config.n_layers, batch, max_len, config.n_heads, config.head_dim, device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, index: int) -> DenseLayer:
        """One layer's K and V, each [B, L_max, H, D] (views: writes land in the cache)."""
        return DenseLayer(self.k[index], self.v[index])

    def check_prefill(self, meta: PrefillMeta) -> None:
        if meta.end > self.max_len:
            raise ValueError(f"positions up to {meta.end} exceed the cache length {self.max_len}")

    def decode_meta(self, positions: torch.Tensor) -> DecodeMeta:
        return DecodeMeta.dense(positions)

    def fork(self, src_row: int, dst_rows: list[int] | range, length: int) -> None:
        """Copy positions [0, length) of `src_row` into each of `dst_rows` (shared-prefix continuations)."""
        if length > self.max_len:
            raise ValueError(f"prefix length {length} exceeds cache length {self.max_len}")
        for row in dst_rows:
            if row != src_row:
                self.k[:, row, :length] = self.k[:, src_row, :length]
                self.v[:, row, :length] = self.v[:, src_row, :length]


class DenseLayer:
    """One layer of a dense cache: rows of [L_max, H, D] K and V."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # each [B, L_max, H, D]

    def __iter__(self):  # (k, v) unpacking, for benchmarks that call a decode kernel directly
        return iter((self.k, self.v))

    def write_prefill(self, k: torch.Tensor, v: torch.Tensor, meta: PrefillMeta) -> None:
        """k, v [B, T, H, D] of the chunk at positions [start, end) of rows `meta.rows`."""
        copy_wide(self.k[meta.rows, meta.start : meta.end], k)
        copy_wide(self.v[meta.rows, meta.start : meta.end], v)

    def prefill_kv(self, meta: PrefillMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, end, H, D] the chunk's queries attend to (views)."""
        return self.k[meta.rows, : meta.end], self.v[meta.rows, : meta.end]

    def write_decode(self, k: torch.Tensor, v: torch.Tensor, meta: DecodeMeta) -> None:
        """k, v [B, H, D]: row b's new token at positions[b]."""
        fused.write_kv(self.k, self.v, k, v, meta.positions)

    def decode_attention(
        self, q: torch.Tensor, meta: DecodeMeta, backend: AttentionBackend, slopes: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q [B, 1, H, D] -> [B, 1, H, D] over each row's first seq_lens[b] keys."""
        return backend.decode(q, self.k, self.v, slopes, meta.seq_lens, scale=scale)


def copy_wide(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) moved as 8-byte words where both layouts allow it. k / v are strided views of the
    fused QKV output; PyTorch's strided copy is bound by element count, and at 2-byte elements it
    moved K and V into the cache at ~1.5 TB/s on the H200 (170 us per 16K-token tensor)."""
    def as_words(t: torch.Tensor) -> torch.Tensor | None:
        width = 8 // t.element_size()
        ok = (
            t.stride(-1) == 1
            and t.shape[-1] % width == 0
            and t.storage_offset() % width == 0
            and all(st % width == 0 for st in t.stride()[:-1])
        )
        return t.view(torch.int64) if ok and 8 % t.element_size() == 0 else None  # [..., D] -> [..., D / width]

    dst_words, src_words = as_words(dst), as_words(src)
    if dst_words is None or src_words is None or dst.dtype != src.dtype:
        dst.copy_(src)
    else:
        dst_words.copy_(src_words)
