"""The step scheduler: which sequences compute which positions this step (torch-free, in the manner
of vLLM v1's vllm/v1/core/sched/scheduler.py).

Per step a token budget: running decodes first (one token each, so streams keep flowing), then
running sequences still in prefill (chunked, so a 60K-token document does not stall the decodes), then
waiting sequences first come first served. Admission looks up the prefix cache; a sequence whose next
uncomputed block is being computed right now by a running sequence on the same tokens waits (it hits
the cache a step later: one prefill per document), without holding up the queue behind it. When a
running sequence cannot get a block, the newest-arrived running sequence is preempted (its blocks
freed, recomputed later from the prefix cache where possible), never the oldest: the oldest always
progresses, so the schedule cannot livelock, and a sequence that fits an empty pool always runs.

Steps may be planned one ahead of the host's knowledge (async scheduling, as vLLM v1's
vllm/v1/core/sched/async_scheduler.py): `update` runs as soon as a step is launched and counts one
placeholder per token that step samples, so the next plan already decodes that token (its id stays on
the device); `append_token` replaces the placeholder with the id once the host has read it. Blocks are
registered by content only over known tokens; a preempted sequence whose token is still in flight is
re-admitted once the token is known; a sequence whose last allowed token is in flight is not decoded
again.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.engine.core.cascade import PrefixGroup, prefix_groups
from pipeline.engine.core.kv_manager import KVManager, blocks_for

log = logging.getLogger(__name__)

__all__ = ["PrefixGroup", "ScheduledSeq", "Scheduler", "SchedulerOutput", "SeqStatus", "Sequence"]


class SeqStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt, then generated tokens (Scheduler.append_token)
    prompt_len: int
    max_new_tokens: int  # 0 for a scoring sequence: it ends once its tokens are computed
    score_from: int | None = None  # scoring: first position whose logits are needed (len(prefix) - 1)
    num_computed: int = 0  # positions whose K/V are in this sequence's blocks
    block_ids: list[int] = field(default_factory=list)  # its block table
    num_cached: int = 0  # tokens served from the prefix cache at its (last) admission
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    num_placeholders: int = 0  # tokens sampled by a launched step whose ids the host has not read yet

    @property
    def num_tokens(self) -> int:
        """Known tokens plus placeholders: the length the next step extends."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def logits_from(self) -> int:
        """The first position whose logits are needed; the prefix-cache hit stops before it."""
        return len(self.token_ids) - 1 if self.score_from is None else self.score_from

    @property
    def is_decode(self) -> bool:
        """Generated at least once and all but the newest token computed: one token this step."""
        return self.num_tokens > self.prompt_len and self.num_computed == self.num_tokens - 1


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # compute positions [start, start + num_tokens): token ids seq.token_ids[start:...]
    num_tokens: int  # (a decode's one token may be a placeholder: start == len(seq.token_ids))
    samples: bool = False  # the step samples the sequence's next token from its last position


def _plan(seq: Sequence, start: int, n: int) -> ScheduledSeq:
    return ScheduledSeq(seq, start, n, samples=seq.score_from is None and start + n == seq.num_tokens)


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq] = field(default_factory=list)  # num_tokens == 1, start == len - 1
    prefills: list[ScheduledSeq] = field(default_factory=list)  # prompt chunks (or recompute)
    preempted: list[str] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended in add()/schedule(): see finish_reason
    prefix_groups: list[PrefixGroup] = field(default_factory=list)  # over decodes only

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.decodes) + sum(s.num_tokens for s in self.prefills)


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, *, max_model_len: int,
                 max_num_batched_tokens: int = 8192, max_prefill_chunk: int | None = None,
                 max_num_seqs: int = 64, min_shared_tokens: int = 512, enable_prefix_caching: bool = True) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1 or (max_prefill_chunk is not None and max_prefill_chunk < 1):
            raise ValueError("token budget, chunk and sequence limits must be >= 1")
        self.kv = KVManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.max_prefill_chunk = max_prefill_chunk or max_num_batched_tokens
        self.min_shared_tokens = min_shared_tokens
        self._seqs: dict[str, Sequence] = {}  # every sequence not finished
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # by arrival
        self._ended: list[Sequence] = []  # finished in add(), reported by the next schedule()
        self._counters = {"prefix_hit_tokens": 0, "preemptions": 0, "tokens_scheduled": 0}
        # per-step state of schedule() (one step at a time)
        self._budget = 0
        self._dec: dict[str, ScheduledSeq] = {}
        self._pre: dict[str, ScheduledSeq] = {}

    # --- requests in and out ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if not seq.token_ids:
            raise ValueError(f"sequence {seq.seq_id} has no tokens")
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        seq.status, seq.num_computed, seq.block_ids, seq.finish_reason = SeqStatus.WAITING, 0, [], None
        if not self._fits(seq):
            seq.status, seq.finish_reason = SeqStatus.FINISHED, "too_long"
            self._ended.append(seq)
            return
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)

    def append_token(self, seq_id: str, token: int) -> None:
        """The host read a sampled token: it replaces the oldest placeholder (or extends the sequence),
        and the block it completes, if computed, becomes findable by content."""
        seq = self._seqs.get(seq_id)
        if seq is None:  # finished meanwhile (canceled, failed): nothing to extend
            log.debug("token for finished sequence %s dropped", seq_id)
            return
        known = len(seq.token_ids)
        seq.token_ids.append(token)
        seq.num_placeholders = max(0, seq.num_placeholders - 1)
        if seq.status is SeqStatus.RUNNING:
            self.kv.commit(seq, min(seq.num_computed, known), min(seq.num_computed, known + 1))

    def finish(self, seq_id: str, reason: str) -> Sequence | None:
        """End a waiting or running sequence now; its blocks return to the pool (cached ones stay
        findable). Its block table is left as it was, so a step already planned with it still runs."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._finish(seq, reason)
        return seq

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.kv.free(seq, clear=False)
        self.kv.forget(seq.seq_id)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        del self._seqs[seq.seq_id]

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._ended)

    def get(self, seq_id: str) -> Sequence | None:
        return self._seqs.get(seq_id)

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": len(self._waiting), "blocks_used": self.kv.num_used,
                "blocks_free": self.kv.num_free, "blocks_cached": self.kv.pool.num_evictable, **self._counters}

    def _fits(self, seq: Sequence) -> bool:
        """Whether the sequence can ever run: its full length fits the context and an empty pool."""
        need = max(len(seq.token_ids), seq.prompt_len + seq.max_new_tokens)
        return need <= self.max_model_len and blocks_for(need, self.block_size) <= self.num_blocks

    # --- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._ended)
        self._ended = []
        self._budget, self._dec, self._pre = self.max_num_batched_tokens, {}, {}
        running = [s for s in self._running if s.is_decode] + [s for s in self._running if not s.is_decode]
        for seq in running:
            if self._budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            if not self._fits(seq):  # grew past its limits (a caller kept appending): end it
                self._finish(seq, "too_long")
                out.finished.append(seq)
                continue
            decode = seq.is_decode
            left = seq.num_tokens - seq.num_computed
            if left <= 0:  # prompt done, waiting for its sampled token: nothing to compute
                continue
            if decode and seq.num_tokens - seq.prompt_len >= seq.max_new_tokens:
                continue  # its last allowed token is in flight: the host ends it once read
            n = 1 if decode else min(left, self.max_prefill_chunk, self._budget)
            if not self._allocate(seq, seq.num_computed + n, out):
                continue
            (self._dec if decode else self._pre)[seq.seq_id] = _plan(seq, seq.num_computed, n)
            self._budget -= n
        if not out.preempted:  # blocks ran short this step: admitting more would only thrash
            self._admit(out)
        out.decodes, out.prefills = list(self._dec.values()), list(self._pre.values())
        bs = self.block_size
        out.prefix_groups = prefix_groups(
            [(s.seq.seq_id, s.seq.block_ids[: s.start // bs]) for s in out.decodes], bs, self.min_shared_tokens)
        self._counters["tokens_scheduled"] += out.num_tokens
        self._dec, self._pre = {}, {}
        return out

    def _allocate(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Slots for positions < num_tokens, preempting the newest-arrived running sequences until they
        fit. False when seq itself had to go."""
        while not self.kv.allocate(seq, num_tokens):
            victim = max(self._running, key=lambda s: s.arrival)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Back to the front of the queue holding nothing; its tokens (generated ones too) are
        recomputed on re-admission, from the prefix cache as far as its blocks survive."""
        self.kv.free(seq)
        self._running.remove(seq)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)
        planned = self._dec.pop(seq.seq_id, None) or self._pre.pop(seq.seq_id, None)
        if planned is not None:
            self._budget += planned.num_tokens
        out.preempted.append(seq.seq_id)
        self._counters["preemptions"] += 1

    def _admit(self, out: SchedulerOutput) -> None:
        bs = self.block_size
        pending = self.kv.pending_keys(self._running)
        skipped: list[Sequence] = []
        while self._waiting and self._budget > 0 and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            if not self._fits(seq):
                self._finish(seq, "too_long")
                out.finished.append(seq)
                continue
            if seq.num_placeholders:  # preempted with a sampled token in flight: re-admitted once it is read
                skipped.append(self._waiting.popleft())
                continue
            limit = min(seq.logits_from, len(seq.token_ids) - 1)
            hit = self.kv.cached_prefix(seq, limit)
            k = len(hit)
            if pending and k < limit // bs and self.kv.block_keys(seq)[k] in pending:
                skipped.append(self._waiting.popleft())  # another sequence is computing that block now
                continue
            start = k * bs
            n = min(len(seq.token_ids) - start, self.max_prefill_chunk, self._budget)
            if not self.kv.admit(seq, hit, start + n):
                break  # first come first served: nobody overtakes a sequence short of blocks
            self._waiting.popleft()
            seq.status, seq.num_cached = SeqStatus.RUNNING, start
            self._counters["prefix_hit_tokens"] += start
            bisect.insort(self._running, seq, key=lambda s: s.arrival)
            self._pre[seq.seq_id] = _plan(seq, start, n)
            self._budget -= n
            if self.kv.enable_prefix_caching:
                pending.update(self.kv.block_keys(seq)[k:])
        self._waiting.extendleft(reversed(skipped))

    def update(self, out: SchedulerOutput) -> None:
        """The runner launched (or ran) `out`: advance the computed counts, register newly full blocks
        whose tokens are known by content, count a placeholder per sampled token, and end scoring
        sequences whose tokens are all computed ("scored"). K/V still being written by the device may be
        planned against: the next step runs after this one on the same stream."""
        for planned in (*out.decodes, *out.prefills):
            seq = planned.seq
            if seq.status is not SeqStatus.RUNNING or seq.num_computed != planned.start:
                continue  # finished (or preempted and re-planned) since this plan was made
            end = planned.start + planned.num_tokens
            seq.num_computed = end
            known = len(seq.token_ids)
            self.kv.commit(seq, min(planned.start, known), min(end, known))
            if planned.samples:
                seq.num_placeholders += 1
            if seq.score_from is not None and end >= len(seq.token_ids):
                self._finish(seq, "scored")
