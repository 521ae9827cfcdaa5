"""Preallocated KV cache: one K and one V tensor [n_layers, B, L_max, H, D].

Rows are independent sequences. A row's K/V for positions [0, n) can be copied into other rows
(`fork`) so several continuations share one prefilled document; a paged cache can later replace this
class behind the same `layer()` / `fork()` surface.
"""

from __future__ import annotations

import torch

from pipeline.engine.config import MptConfig


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

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [B, L_max, H, D] (views: writes land in the cache)."""
        return self.k[index], self.v[index]

    def fork(self, src_row: int, dst_rows: list[int] | range, length: int) -> None:
        """Copy positions [0, length) of `src_row` into each of `dst_rows` (shared-prefix continuations)."""
        if length > self.max_len:
            raise ValueError(f"prefix length {length} exceeds cache length {self.max_len}")
        for row in dst_rows:
            if row != src_row:
                self.k[:, row, :length] = self.k[:, src_row, :length]
                self.v[:, row, :length] = self.v[:, src_row, :length]


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
