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
