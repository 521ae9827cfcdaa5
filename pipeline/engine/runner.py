"""The model runner: turns one scheduler step plan into tensors, runs the model, samples.

Per step: the prefill chunks run through chunk_prefill.py (each its own forward, or all of them one),
then all decoding sequences run as one batched step over the paged cache. Decode inputs live in static buffers per batch-size bucket, so on CUDA each bucket's
step is captured once into a CUDA graph and replayed (padded rows read and write the pool's scratch
block). Decoding rows that share a document's blocks are handed to the attention kernel as groups
(CascadeMeta): the shared prefix is read once per step for the whole group.

`launch` only queues work on the device's stream and never waits for it (async scheduling): host
inputs go through pinned buffers, the sampled tokens stay on the device, and a decode row whose
token the host has not read yet (a scheduler placeholder) takes it from the previous launch's
sampled tokens on the device (the hand-over buffer). The decode step itself (inside its graph)
unpacks its inputs, takes placeholder tokens from the hand-over, picks greedily with the token's
log p and writes its picks into the hand-over; only non-greedy rows and prompts' first tokens are
sampled outside, from the logits the step keeps. The results come back through a StepReadback
(readback.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.engine.chunk_prefill import ChunkPrefill
from pipeline.engine.core.requests import SamplingParams
from pipeline.engine.core.scheduler import PrefixGroup, ScheduledSeq, SchedulerOutput
from pipeline.engine.decode_inputs import POSITION, SEQ_LEN, SLOT, SRC, TAKE, TOKEN, DecodeInputs
from pipeline.engine.metadata import CascadeMeta, DecodeMeta
from pipeline.engine.model import Mpt
from pipeline.engine.paged_cache import PagedKVCache
from pipeline.engine.readback import StepReadback, StepResult, host_tensor
from pipeline.engine.sampling import greedy_pick, select_next

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


class ModelRunner:
    def __init__(self, model: Mpt, cache: PagedKVCache, *, max_num_seqs: int, max_model_len: int,
                 cuda_graphs: bool | None = None, batch_prefills: bool = False) -> None:
        self.model, self.cache = model, cache
        self.prefills = ChunkPrefill(model, cache, together=batch_prefills)
        self.device = model.device
        self.block_size = cache.block_size
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.buckets = buckets_for(max_num_seqs)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._inputs: dict[tuple[int, bool, bool], DecodeInputs] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # the last launch's sampled tokens on the device (the decode step writes its greedy picks here
        # itself, inside its graph), and which row each sequence's token is in
        self._handover = torch.zeros(max_num_seqs, dtype=torch.long, device=self.device)
        self._last_rows: dict[str, int] = {}

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, sampling: Mapping[str, SamplingState]) -> StepReadback:
        """Queue the step on the device; its results arrive through the returned readback. A decode-only
        step of greedy rows queues the packed input copy, the graph replay and one copy back: the pick,
        its log p and the hand-over to the next step are inside the graph."""
        scored: list[tuple[str, torch.Tensor]] = []
        ids: list[str] = []
        parts: list[torch.Tensor] = []  # picks [n, 2] float64: (token id, its log p) per row
        handed_over = False  # whether the decode step's own hand-over holds every sampled token
        if out.decodes:
            logits, logp, picks = self._decode(out.decodes, out.prefix_groups)  # [B, V], [B, V], [B, 2]
            ids.extend(s.seq.seq_id for s in out.decodes)
            states = [sampling[sid] for sid in ids]
            handed_over = all(state.params.is_greedy for state in states)
            parts.append(self._sample_rows(logits, logp, picks, states))
        last: list[tuple[str, torch.Tensor]] = []  # (seq id, logits [V]) of prompts completed now
        rows = self.prefills.run(out.prefills, scored)
        for chunk, row in zip(out.prefills, rows, strict=True):
            if row is not None:
                last.append((chunk.seq.seq_id, row))
        if last:
            logits = torch.stack([row for _, row in last])  # [P, V]
            logp, tokens, token_logp = greedy_pick(logits)
            picks = torch.stack([tokens.double(), token_logp.double()], dim=1)
            parts.append(self._sample_rows(logits, logp, picks, [sampling[sid] for sid, _ in last]))
            ids.extend(sid for sid, _ in last)
            handed_over = False
        picks = None
        if parts:
            picks = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, 2]
            if not handed_over:  # a sampled row or a prompt's first token: not in the graph's hand-over
                assert picks.shape[0] <= self._handover.shape[0]
                self._handover[: picks.shape[0]].copy_(picks[:, 0].long())
        self._last_rows = {sid: i for i, sid in enumerate(ids)}
        return StepReadback(ids, picks, scored)

    @property
    def batch_prefills(self) -> bool:
        """Whether a step's prefill chunks run as one forward (switchable between steps, for benches)."""
        return self.prefills.together

    @batch_prefills.setter
    def batch_prefills(self, on: bool) -> None:
        self.prefills.together = on

    def execute(self, out: SchedulerOutput, sampling: Mapping[str, SamplingState]) -> StepResult:
        """launch + wait (scripts and tests that step synchronously)."""
        return self.launch(out, sampling).result()

    # --- decode -------------------------------------------------------------------------------

    def _bucket(self, batch: int) -> int:
        if not self.cuda_graphs:
            return batch
        return next((b for b in self.buckets if b >= batch), batch)

    def _decode(self, decodes: Sequence[ScheduledSeq],
                groups: Sequence[PrefixGroup]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batched decode step: (logits [B, V], log p [B, V], greedy picks [B, 2]) of its real rows."""
        batch = len(decodes)
        bucket = self._bucket(batch)
        use_cascade = bool(groups)
        # a graph keeps the cache's skip_decode it was captured with: each setting has its own (a bench
        # switches it between runs; freeing captured graphs and capturing again into the shared pool
        # hit an allocator assert on the H200, session 7 run 2)
        key = (bucket, use_cascade, self.cache.skip_decode)
        inputs = self._inputs.get(key)
        if inputs is None:
            inputs = self._inputs[key] = DecodeInputs(bucket, self.max_blocks, use_cascade, self.device)
        self._fill(inputs, decodes, groups)
        if not self.cuda_graphs:
            inputs.logits, inputs.logp, inputs.picks = self._body(inputs, inputs.meta())
        else:
            if inputs.graph is None:
                self._capture(inputs)
            assert inputs.graph is not None
            inputs.graph.replay()
        assert inputs.logits is not None and inputs.logp is not None and inputs.picks is not None
        return inputs.logits[:batch], inputs.logp[:batch], inputs.picks[:batch]

    def _fill(self, inputs: DecodeInputs, decodes: Sequence[ScheduledSeq], groups: Sequence[PrefixGroup]) -> None:
        """Host-side step inputs (tokens, positions, lengths, each new token's slot, block tables;
        padded rows -> scratch block) as one packed copy into the static buffers, which the step's
        metadata views. A token the host has not read yet (a placeholder: the scheduler plans one step
        ahead at most) is marked to be taken from the hand-over row the last launch sampled it into."""
        bs = self.block_size
        packed, header, table = inputs.host_array(self.cache.scratch_block, bs)
        row_of: dict[str, int] = {}
        for row, chunk in enumerate(decodes):
            seq, pos = chunk.seq, chunk.start
            if pos < len(seq.token_ids):
                header[TOKEN, row] = seq.token_ids[pos]
            else:
                header[TAKE, row], header[SRC, row] = 1, self._last_rows[seq.seq_id]
            header[POSITION, row], header[SEQ_LEN, row] = pos, pos + 1
            header[SLOT, row] = seq.block_ids[pos // bs] * bs + pos % bs
            table[row, : len(seq.block_ids)] = seq.block_ids
            row_of[seq.seq_id] = row
        inputs.packed.copy_(host_tensor(packed, self.device), non_blocking=True)
        if inputs.cascade is not None:
            self._fill_cascade(inputs.cascade, groups, row_of, inputs.batch)

    def _body(self, inputs: DecodeInputs, meta: DecodeMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured step (run as is off CUDA): the step's tokens from the packed inputs, the model's
        decode step, then the greedy pick and its log p, handed over for the next step's placeholder
        rows. Returns (logits, log p, picks [B, 2])."""
        tokens = inputs.unpack(self._handover)
        logits = self.model.decode(tokens, self.cache, inputs.positions, meta)
        logp, picked, picked_logp = greedy_pick(logits)
        self._handover[: inputs.batch].copy_(picked)
        return logits, logp, torch.stack([picked.double(), picked_logp.double()], dim=1)

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

    def _capture(self, inputs: DecodeInputs) -> None:
        """Capture the step of this bucket with the first real inputs in the buffers. The warm-up runs
        write the same K/V into the same slots the first replay writes again, and each starts from the
        hand-over as the last launch left it (a run overwrites it with its own picks), so they leave
        nothing."""
        start = time.perf_counter()
        meta = inputs.meta()
        handover = self._handover.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._handover.copy_(handover)
                self._body(inputs, meta)
            self._handover.copy_(handover)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            inputs.logits, inputs.logp, inputs.picks = self._body(inputs, meta)
        inputs.graph = graph
        log.info("captured the decode step for batch %d (cascade %s) in %.2f s", inputs.batch,
                 inputs.cascade is not None, time.perf_counter() - start)

    # --- sampling -----------------------------------------------------------------------------

    @staticmethod
    def _sample_rows(logits: torch.Tensor, logp: torch.Tensor, picks: torch.Tensor,
                     states: Sequence[SamplingState]) -> torch.Tensor:
        """Greedy picks [N, 2] (token id, log p) -> each row's pick under its own sampling: greedy rows
        keep theirs, the others sample from their logits [N, V] (log p from logp [N, V]), on the device."""
        if all(state.params.is_greedy for state in states):
            return picks
        chosen: list[torch.Tensor] = []
        for i, state in enumerate(states):
            if state.params.is_greedy:
                chosen.append(picks[i : i + 1, 0].long())
            else:
                gens = [state.generator] if state.generator is not None else None
                chosen.append(select_next(logits[i : i + 1], state.params, gens))
        tokens = torch.cat(chosen)  # [N]
        return torch.stack([tokens.double(), logp.gather(-1, tokens[:, None])[:, 0].double()], dim=1)
