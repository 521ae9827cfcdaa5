"""The model runner: turns one scheduler step plan into tensors, runs the model, samples.

Per step: each prefill chunk runs as its own forward (a chunk is hundreds to thousands of tokens:
compute-bound, batching adds nothing), then all decoding sequences run as one batched step over the
paged cache. Decode inputs live in static buffers per batch-size bucket, so on CUDA each bucket's
step is captured once into a CUDA graph and replayed (padded rows read and write the pool's scratch
block). Decoding rows that share a document's blocks are handed to the attention kernel as groups
(CascadeMeta): the shared prefix is read once per step for the whole group.

`launch` only queues work on the device's stream and never waits for it (async scheduling): host
inputs go through pinned buffers, the sampled tokens stay on the device, and a decode row whose
token the host has not read yet (a scheduler placeholder) takes it from the previous launch's
sampled tokens on the device. The results come back through a StepReadback (readback.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.engine.core.requests import SamplingParams
from pipeline.engine.core.scheduler import PrefixGroup, ScheduledSeq, SchedulerOutput
from pipeline.engine.metadata import CascadeMeta, DecodeMeta, PrefillMeta
from pipeline.engine.model import Mpt
from pipeline.engine.paged_cache import PagedKVCache
from pipeline.engine.readback import StepReadback, StepResult, host_tensor, to_device
from pipeline.engine.sampling import select_next

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager runs on a side stream before a capture (lazy init, Triton JIT) as graphs.py does


@dataclass
class SamplingState:
    """How one sequence picks its tokens: its parameters and, for seeded sampling, its own RNG (so its
    samples never depend on what else shares the batch)."""

    params: SamplingParams
    generator: torch.Generator | None = None


def buckets_for(max_num_seqs: int) -> list[int]:
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return [*out, max_num_seqs]


class _DecodeInputs:
    """Static input buffers of one decode batch size (and the graph that reads them)."""

    def __init__(self, batch: int, max_blocks: int, cascade: bool, device: torch.device) -> None:
        i32, i64 = torch.int32, torch.long
        self.batch = batch
        self.tokens = torch.zeros(batch, dtype=i64, device=device)
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
        self.logits: torch.Tensor | None = None

    def meta(self) -> DecodeMeta:
        return DecodeMeta(positions=self.positions, seq_lens=self.seq_lens, block_tables=self.block_tables,
                          seq_lens_i32=self.seq_lens_i32, slot_mapping=self.slots, cascade=self.cascade)


class ModelRunner:
    def __init__(self, model: Mpt, cache: PagedKVCache, *, max_num_seqs: int, max_model_len: int,
                 cuda_graphs: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.device = model.device
        self.block_size = cache.block_size
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.buckets = buckets_for(max_num_seqs)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._inputs: dict[tuple[int, bool], _DecodeInputs] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # the last launch's sampled tokens [N] on the device, and which sequence each row belongs to
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, sampling: Mapping[str, SamplingState]) -> StepReadback:
        """Queue the step on the device; its results arrive through the returned readback."""
        pending: list[tuple[str, torch.Tensor]] = []  # (seq id, logits [V]) to sample from
        scored: list[tuple[str, torch.Tensor]] = []
        if out.decodes:
            logits = self._decode(out.decodes, out.prefix_groups)  # [B, V]
            pending.extend((s.seq.seq_id, logits[i]) for i, s in enumerate(out.decodes))
        for chunk in out.prefills:
            last = self._prefill(chunk, scored)
            if last is not None:
                pending.append((chunk.seq.seq_id, last))
        tokens = logprobs = None
        if pending:
            tokens, logprobs = self._sample(pending, sampling)
        self._last_sampled = tokens
        self._last_rows = {sid: i for i, (sid, _) in enumerate(pending)}
        return StepReadback([sid for sid, _ in pending], tokens, logprobs, scored)

    def execute(self, out: SchedulerOutput, sampling: Mapping[str, SamplingState]) -> StepResult:
        """launch + wait (scripts and tests that step synchronously)."""
        return self.launch(out, sampling).result()

    # --- prefill ------------------------------------------------------------------------------

    def _prefill(self, chunk: ScheduledSeq, scored: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """One chunk of one sequence. Returns the last position's logits [V] when the chunk completes a
        generating sequence's prompt (its first token is sampled from them); a scoring chunk appends
        (seq id, log p of its target tokens, on the device) to `scored`."""
        seq, s, n = chunk.seq, chunk.start, chunk.num_tokens
        e = s + n
        ids = seq.token_ids
        tokens = to_device(np.asarray(ids[s:e], dtype=np.int64), self.device)[None]  # [1, T]
        meta = PrefillMeta(start=s, num_tokens=n, block_ids=tuple(seq.block_ids),
                           block_index=to_device(np.asarray(seq.block_ids, dtype=np.int64), self.device))
        if seq.score_from is None:
            logits = self.model.prefill(tokens, self.cache, meta=meta, logits_from=-1 if chunk.samples else None)
            return logits[0, -1] if logits is not None else None
        lo, hi = max(s, seq.score_from), min(e, len(ids) - 1)  # positions whose next token is a target
        if lo >= hi:
            self.model.prefill(tokens, self.cache, meta=meta, logits_from=None)
            return None
        logits = self.model.prefill(tokens, self.cache, meta=meta, logits_from=lo - s)  # [1, e - lo, V]
        logp = torch.log_softmax(logits[0, : hi - lo], dim=-1)  # [hi - lo, V]
        targets = to_device(np.asarray(ids[lo + 1 : hi + 1], dtype=np.int64), self.device)
        scored.append((seq.seq_id, logp.gather(-1, targets[:, None])[:, 0].double()))
        return None

    # --- decode -------------------------------------------------------------------------------

    def _bucket(self, batch: int) -> int:
        if not self.cuda_graphs:
            return batch
        return next((b for b in self.buckets if b >= batch), batch)

    def _decode(self, decodes: Sequence[ScheduledSeq], groups: Sequence[PrefixGroup]) -> torch.Tensor:
        batch = len(decodes)
        bucket = self._bucket(batch)
        use_cascade = bool(groups)
        key = (bucket, use_cascade)
        inputs = self._inputs.get(key)
        if inputs is None:
            inputs = self._inputs[key] = _DecodeInputs(bucket, self.max_blocks, use_cascade, self.device)
        self._fill(inputs, decodes, groups)
        if not self.cuda_graphs:
            return self._body(inputs, inputs.meta())[:batch]
        if inputs.graph is None:
            self._capture(inputs)
        assert inputs.graph is not None and inputs.logits is not None
        inputs.graph.replay()
        return inputs.logits[:batch]

    def _fill(self, inputs: _DecodeInputs, decodes: Sequence[ScheduledSeq], groups: Sequence[PrefixGroup]) -> None:
        """Host-side step inputs (tokens, positions, block tables; padded rows -> scratch block), copied
        into the static buffers. Lengths and slots are derived on the device (`_body`). A token the host
        has not read yet is taken from the previous launch's sampled tokens, on the device."""
        bucket, scratch, dev = inputs.batch, self.cache.scratch_block, self.device
        tokens = np.zeros(bucket, dtype=np.int64)
        positions = np.zeros(bucket, dtype=np.int64)
        table = np.full((bucket, self.max_blocks), scratch, dtype=np.int32)
        on_device: list[tuple[int, int]] = []  # (row, index into the last launch's sampled tokens)
        row_of: dict[str, int] = {}
        for row, chunk in enumerate(decodes):
            seq = chunk.seq
            if chunk.start < len(seq.token_ids):
                tokens[row] = seq.token_ids[chunk.start]
            else:  # a placeholder: sampled by the last launch (the scheduler plans one step ahead at most)
                on_device.append((row, self._last_rows[seq.seq_id]))
            positions[row] = chunk.start
            table[row, : len(seq.block_ids)] = seq.block_ids
            row_of[seq.seq_id] = row
        inputs.tokens.copy_(host_tensor(tokens, dev), non_blocking=True)
        if on_device:
            assert self._last_sampled is not None
            n = len(on_device)
            if all(r == i == j for i, (r, j) in enumerate(on_device)):  # steady decoding: rows as sampled
                inputs.tokens[:n].copy_(self._last_sampled[:n])
            else:
                rows, src = to_device(np.array(on_device, dtype=np.int64).T, dev)  # [2, n]
                inputs.tokens.index_copy_(0, rows, self._last_sampled.index_select(0, src))
        inputs.positions.copy_(host_tensor(positions, dev), non_blocking=True)
        inputs.block_tables.copy_(host_tensor(table, dev), non_blocking=True)
        if inputs.cascade is not None:
            self._fill_cascade(inputs.cascade, groups, row_of, bucket)

    def _body(self, inputs: _DecodeInputs, meta: DecodeMeta) -> torch.Tensor:
        """The captured step: lengths and each new token's slot from positions and block tables, then
        the model's decode step."""
        bs = self.block_size
        inputs.seq_lens.copy_(inputs.positions + 1)
        inputs.seq_lens_i32.copy_(inputs.seq_lens)
        blocks = inputs.block_tables.gather(1, (inputs.positions // bs)[:, None])[:, 0]  # [B]
        inputs.slots.copy_(blocks.long() * bs + inputs.positions % bs)
        return self.model.decode(inputs.tokens, self.cache, inputs.positions, meta)

    def _fill_cascade(self, cascade: CascadeMeta, groups: Sequence[PrefixGroup], row_of: dict[str, int],
                      bucket: int) -> None:
        n_groups = cascade.prefix_lens.shape[0]
        tables = np.zeros((n_groups, self.max_blocks), dtype=np.int32)
        lens = np.zeros(n_groups, dtype=np.int32)
        row_group = np.full(bucket, -1, dtype=np.int32)
        group_rows = np.full((n_groups, bucket), -1, dtype=np.int32)
        for g, group in enumerate(groups[:n_groups]):
            tables[g, : len(group.block_ids)] = group.block_ids
            lens[g] = group.num_tokens
            rows = [row_of[sid] for sid in group.seq_ids]
            row_group[rows] = g
            group_rows[g, : len(rows)] = rows
        for dst, src in ((cascade.prefix_block_tables, tables), (cascade.prefix_lens, lens),
                         (cascade.row_group, row_group), (cascade.group_rows, group_rows)):
            dst.copy_(host_tensor(src, self.device), non_blocking=True)

    def _capture(self, inputs: _DecodeInputs) -> None:
        """Capture the step of this bucket with the first real inputs in the buffers. The warm-up runs
        write the same K/V into the same slots the first replay writes again, so they leave nothing."""
        start = time.perf_counter()
        meta = inputs.meta()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._body(inputs, meta)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            inputs.logits = self._body(inputs, meta)
        inputs.graph = graph
        log.info("captured the decode step for batch %d (cascade %s) in %.2f s", inputs.batch,
                 inputs.cascade is not None, time.perf_counter() - start)

    # --- sampling -----------------------------------------------------------------------------

    def _sample(self, pending: list[tuple[str, torch.Tensor]],
                sampling: Mapping[str, SamplingState]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens [N] and their log p [N], on the device (nothing read back here)."""
        logits = torch.stack([row for _, row in pending])  # [N, V] float32
        logp = torch.log_softmax(logits, dim=-1)
        states = [sampling[seq_id] for seq_id, _ in pending]
        greedy = logits.argmax(dim=-1)  # [N]
        if all(state.params.is_greedy for state in states):
            tokens = greedy
        else:
            picks: list[torch.Tensor] = []
            for i, state in enumerate(states):
                if state.params.is_greedy:
                    picks.append(greedy[i : i + 1])
                else:
                    gens = [state.generator] if state.generator is not None else None
                    picks.append(select_next(logits[i : i + 1], state.params, gens))
            tokens = torch.cat(picks)  # [N]
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
