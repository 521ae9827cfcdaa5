"""Static buffers of one decode batch size (bucket): what the runner's decode step reads and writes.

The host sends each step's inputs as one packed int32 array (one host-to-device copy, not one per
tensor): a header of four rows [4, B] (the host's token, whether the row takes its token from the
hand-over buffer instead, which hand-over row, the position) and the block tables [B, max_blocks].
`unpack` runs inside the step (inside the CUDA graph): it spreads the array into the attention
metadata's buffers and picks each row's token, so a placeholder row (a token the host has not read
yet) gets the previous launch's sampled token without a copy outside the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.engine.metadata import CascadeMeta, DecodeMeta

TOKEN, TAKE, SRC, POSITION = range(4)  # rows of the packed header


class DecodeInputs:
    def __init__(self, batch: int, max_blocks: int, cascade: bool, device: torch.device) -> None:
        i32, i64 = torch.int32, torch.long
        self.batch, self.max_blocks = batch, max_blocks
        self.packed = torch.zeros(4 * batch + batch * max_blocks, dtype=i32, device=device)
        self.positions = torch.zeros(batch, dtype=i64, device=device)
        self.seq_lens = torch.ones(batch, dtype=i64, device=device)
        self.seq_lens_i32 = torch.ones(batch, dtype=i32, device=device)
        self.block_tables = torch.zeros(batch, max_blocks, dtype=i32, device=device)
        self.slots = torch.zeros(batch, dtype=i64, device=device)
        self.cascade: CascadeMeta | None = None
        if cascade:
            groups = max(1, batch // 2)
            self.cascade = CascadeMeta(
                prefix_block_tables=torch.zeros(groups, max_blocks, dtype=i32, device=device),
                prefix_lens=torch.zeros(groups, dtype=i32, device=device),
                row_group=torch.full((batch,), -1, dtype=i32, device=device),
                group_rows=torch.full((groups, batch), -1, dtype=i32, device=device),
            )
        self.graph: torch.cuda.CUDAGraph | None = None
        # the step's outputs (a graph's static outputs): logits [B, V], log p [B, V], picks [B, 2] float64
        # (greedy token id, its log p: one tensor, so one copy brings both back)
        self.logits: torch.Tensor | None = None
        self.logp: torch.Tensor | None = None
        self.picks: torch.Tensor | None = None

    def host_array(self, scratch_block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A fresh packed host array, its header view [4, B] and its block-table view [B, max_blocks]
        (padded rows: position 0 in the scratch block)."""
        b = self.batch
        packed = np.zeros(4 * b + b * self.max_blocks, dtype=np.int32)
        table = packed[4 * b :].reshape(b, self.max_blocks)
        table[:] = scratch_block
        return packed, packed[: 4 * b].reshape(4, b), table

    def unpack(self, handover: torch.Tensor) -> torch.Tensor:
        """On the device: positions and block tables into their buffers; returns the step's tokens [B]
        int64, each the host's or, for a placeholder row, handover[src]."""
        b = self.batch
        header = self.packed[: 4 * b].view(4, b)
        self.positions.copy_(header[POSITION])
        self.block_tables.copy_(self.packed[4 * b :].view(b, self.max_blocks))
        from_last = handover.index_select(0, header[SRC].long())
        return torch.where(header[TAKE].bool(), from_last, header[TOKEN].long())

    def meta(self) -> DecodeMeta:
        return DecodeMeta(positions=self.positions, seq_lens=self.seq_lens, block_tables=self.block_tables,
                          seq_lens_i32=self.seq_lens_i32, slot_mapping=self.slots, cascade=self.cascade)
