"""Static buffers of one decode batch size (bucket): what the runner's decode step reads and writes.

The host sends each step's inputs as one packed int32 array (one host-to-device copy, not one per
tensor): a header of six rows [6, B] (the host's token, whether the row takes its token from the
hand-over buffer instead, which hand-over row, the position, the sequence length and the new
token's cache slot) and the block tables [B, max_blocks]. The attention metadata's tensors are views
into that one device buffer, so the step spends no kernel on spreading it: the host knows every
row's position (a placeholder row's token is unknown, its position is not), so it computes lengths
and slots itself. `unpack` runs inside the step (inside the CUDA graph) and only picks each row's
token, so a placeholder row (a token the host has not read yet) gets the previous launch's sampled
token without a copy outside the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.engine.metadata import CascadeMeta, DecodeMeta

TOKEN, TAKE, SRC, POSITION, SEQ_LEN, SLOT = range(6)  # rows of the packed header
HEADER_ROWS = 6


class DecodeInputs:
    def __init__(self, batch: int, max_blocks: int, cascade: bool, device: torch.device) -> None:
        i32 = torch.int32
        self.batch, self.max_blocks = batch, max_blocks
        self.packed = torch.zeros(HEADER_ROWS * batch + batch * max_blocks, dtype=i32, device=device)
        header = self.packed[: HEADER_ROWS * batch].view(HEADER_ROWS, batch)
        self.header = header
        # views of the packed buffer (int32): what the paged cache and its kernels read
        self.positions = header[POSITION]
        self.seq_lens = header[SEQ_LEN]
        self.slots = header[SLOT]
        self.block_tables = self.packed[HEADER_ROWS * batch :].view(batch, max_blocks)
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

    def host_array(self, scratch_block: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A fresh packed host array, its header view [6, B] and its block-table view [B, max_blocks]
        (padded rows: position 0 of the scratch block, length 1)."""
        b = self.batch
        packed = np.zeros(HEADER_ROWS * b + b * self.max_blocks, dtype=np.int32)
        header = packed[: HEADER_ROWS * b].reshape(HEADER_ROWS, b)
        table = packed[HEADER_ROWS * b :].reshape(b, self.max_blocks)
        table[:] = scratch_block
        header[SEQ_LEN] = 1
        header[SLOT] = scratch_block * block_size
        return packed, header, table

    def unpack(self, handover: torch.Tensor) -> torch.Tensor:
        """On the device: the step's tokens [B] int64, each the host's or, for a placeholder row,
        handover[src]."""
        header = self.header
        from_last = handover.index_select(0, header[SRC])
        return torch.where(header[TAKE].bool(), from_last, header[TOKEN].long())

    def meta(self) -> DecodeMeta:
        return DecodeMeta(positions=self.positions, seq_lens=self.seq_lens, block_tables=self.block_tables,
                          seq_lens_i32=self.seq_lens, slot_mapping=self.slots, cascade=self.cascade)
