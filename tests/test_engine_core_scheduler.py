"""The torch-free step scheduler (pipeline/engine/core/scheduler.py), driven by a fake engine.

The fake model is a pure function of the token history, and it reads that history from a simulated
paged KV store through the sequence's block table (not from token_ids): a wrong prefix-cache hit, a
block written while shared, or a position claimed computed but never written changes its output. So
"continuously batched, cached, chunked, preempted == each sequence run alone" is checked end to end.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import zlib
from array import array
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.engine.core.cascade import prefix_groups
from pipeline.engine.core.scheduler import Scheduler, SchedulerOutput, SeqStatus, Sequence

ROOT = Path(__file__).resolve().parents[1]
_arrivals = itertools.count()
VOCAB, EOS = 40, 0


def next_token(history: list[int]) -> int:
    return zlib.crc32(array("q", history).tobytes()) % VOCAB


def score(history: list[int], target: int) -> float:
    return (zlib.crc32(array("q", [*history, target]).tobytes()) % 1000) / 1000.0


def alone(prompt: list[int], max_new: int, score_from: int | None) -> tuple[list[int], str, list[float]]:
    """What one sequence gives run by itself: generated tokens, finish reason, per-position scores."""
    if score_from is not None:
        return [], "scored", [score(prompt[: p + 1], prompt[p + 1]) for p in range(score_from, len(prompt) - 1)]
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(next_token(ids))
        if ids[-1] == EOS:
            return ids[len(prompt):], "eos", []
    return ids[len(prompt):], "length", []


@dataclass
class Launched:
    """What one launched step will tell the host: sampled tokens and scores, per sequence object."""

    out: SchedulerOutput
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)
    scores: list[tuple[Sequence, int, list[float]]] = field(default_factory=list)  # (seq, its epoch, values)


@dataclass
class FakeEngine:
    """`behind`: the host learns each step's tokens one step late, as the serving engine's async steps
    do: the next step is planned (and launched) first, its placeholder tokens read from the fake
    device's last sampled tokens, and only then are the previous step's tokens applied."""

    sched: Scheduler
    behind: bool = False
    store: dict[tuple[int, int], int] = field(default_factory=dict)  # (block, offset) -> token "K/V"
    results: dict[str, tuple[list[int], str, list[float]]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    pending: Launched | None = None
    device_tokens: dict[str, int] = field(default_factory=dict)  # the last step's sampled tokens, "on device"
    in_flight_preempted: int = 0  # preempted while a token of theirs was in flight

    def add(self, seq_id: str, prompt: list[int], max_new: int, score_from: int | None = None) -> Sequence:
        seq = Sequence(seq_id=seq_id, token_ids=list(prompt), prompt_len=len(prompt),
                       max_new_tokens=max_new, score_from=score_from, arrival=next(_arrivals))
        self.sched.add(seq)
        return seq

    def read(self, seq: Sequence, upto: int) -> list[int]:
        bs = self.sched.block_size
        return [self.store.get((seq.block_ids[p // bs], p % bs), -1) for p in range(upto)]

    def has_work(self) -> bool:
        return self.sched.has_work() or self.pending is not None

    def step(self) -> SchedulerOutput:
        s = self.sched
        out = s.schedule()
        self.steps += 1
        s.kv.pool.check()
        check_plan(s, out)
        for seq in out.finished:
            self.results[seq.seq_id] = ([], seq.finish_reason or "?", [])
        for sid in out.preempted:  # its recompute scores every scored position again (the hit stops before)
            self.scores.pop(sid, None)
            self.in_flight_preempted += s.get(sid).num_placeholders > 0  # type: ignore[union-attr]
        launched = Launched(out)
        bs = s.block_size
        for plan in (*out.decodes, *out.prefills):
            seq, end = plan.seq, plan.start + plan.num_tokens
            for p in range(plan.start, end):  # write this chunk's K/V; a placeholder comes from the device
                tok = seq.token_ids[p] if p < len(seq.token_ids) else self.device_tokens[seq.seq_id]
                self.store[(seq.block_ids[p // bs], p % bs)] = tok
            if seq.score_from is not None:
                hist = self.read(seq, end)
                lo, hi = max(plan.start, seq.score_from), min(end, len(seq.token_ids) - 1)
                launched.scores.append((seq, seq.num_preemptions, [
                    score(hist[: p + 1], seq.token_ids[p + 1]) for p in range(lo, hi)]))
            elif plan.samples:
                launched.sampled.append((seq, next_token(self.read(seq, end))))
        s.update(out)
        self.device_tokens = {seq.seq_id: tok for seq, tok in launched.sampled}
        if self.behind:
            if self.pending is not None:
                self.apply(self.pending)
            self.pending = launched if (out.decodes or out.prefills) else None
        else:
            self.apply(launched)
        s.kv.pool.check()
        return out

    def apply(self, launched: Launched) -> None:
        s = self.sched
        for seq, epoch, values in launched.scores:
            if epoch == seq.num_preemptions:  # scores of a run since preempted come again
                self.scores.setdefault(seq.seq_id, []).extend(values)
        for seq, tok in launched.sampled:
            if s.get(seq.seq_id) is not seq:  # finished (canceled, ended a step late) meanwhile: dropped
                continue
            s.append_token(seq.seq_id, tok)
            gen = seq.token_ids[seq.prompt_len:]
            if tok == EOS or len(gen) >= seq.max_new_tokens:
                s.finish(seq.seq_id, "eos" if tok == EOS else "length")
                self.results[seq.seq_id] = (gen, seq.finish_reason or "?", [])
        for plan in launched.out.prefills:
            seq = plan.seq
            if seq.finish_reason == "scored" and seq.seq_id not in self.results:
                self.results[seq.seq_id] = ([], "scored", self.scores.get(seq.seq_id, []))

    def run(self, max_steps: int = 20_000) -> None:
        while self.has_work():
            self.step()
            assert self.steps < max_steps, "the scheduler stopped making progress"


def check_plan(s: Scheduler, out: SchedulerOutput) -> None:
    """Every step plan respects the budget, the chunk and sequence limits and the block tables."""
    bs = s.block_size
    assert out.num_tokens <= s.max_num_batched_tokens
    assert s.stats()["running"] <= s.max_num_seqs
    seen = [p.seq.seq_id for p in (*out.decodes, *out.prefills)]
    assert len(seen) == len(set(seen))
    assert not set(seen) & set(out.preempted)
    for p in out.decodes:  # its one token is known, or a placeholder the last step sampled
        assert p.num_tokens == 1 and p.start == p.seq.num_tokens - 1 == p.seq.num_computed and p.samples
        assert p.seq.num_placeholders <= 1 and p.seq.num_tokens - p.seq.prompt_len < p.seq.max_new_tokens
    for p in out.prefills:
        assert 1 <= p.num_tokens <= s.max_prefill_chunk and p.start == p.seq.num_computed
        assert p.start + p.num_tokens <= len(p.seq.token_ids)
    for p in (*out.decodes, *out.prefills):
        assert p.seq.status is SeqStatus.RUNNING
        assert len(p.seq.block_ids) * bs >= p.start + p.num_tokens
        assert all(s.kv.pool.ref_count(b) > 0 for b in p.seq.block_ids)
    decode_ids = {p.seq.seq_id: p.seq for p in out.decodes}
    grouped: list[str] = []
    for g in out.prefix_groups:
        assert len(g.seq_ids) >= 2 and g.num_tokens == len(g.block_ids) * bs >= s.min_shared_tokens
        for sid in g.seq_ids:
            seq = decode_ids[sid]
            assert seq.block_ids[: len(g.block_ids)] == g.block_ids and g.num_tokens <= seq.num_computed
        grouped += g.seq_ids
    assert len(grouped) == len(set(grouped))


def check_results(eng: FakeEngine, specs: dict[str, tuple[list[int], int, int | None]],
                  canceled: AbstractSet[str] = frozenset()) -> None:
    s = eng.sched
    for sid, (prompt, max_new, score_from) in specs.items():
        fits = (len(prompt) + max_new <= s.max_model_len
                and -(-(len(prompt) + max_new) // s.block_size) <= s.num_blocks)
        if not fits:
            assert eng.results[sid][1] == "too_long", sid
        elif sid not in canceled:
            assert eng.results[sid] == alone(prompt, max_new, score_from), sid
    st_ = s.stats()
    assert st_["blocks_used"] == 0 and st_["running"] == st_["waiting"] == 0
    assert s.kv.num_free == s.num_blocks
    s.kv.pool.check()


# --- randomized: arrivals, documents, cancellations, preemptions -----------------------------

DOCS = [[(7 * i + d) % (VOCAB - 1) + 1 for i in range(30)] for d in range(3)]

seq_spec = st.tuples(
    st.integers(0, 3),  # document (3 = none)
    st.integers(0, 30),  # how much of it
    st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=6),  # own suffix
    st.integers(0, 16),  # max new tokens (0: a scoring sequence)
    st.integers(0, 8),  # arrival step
    st.one_of(st.none(), st.integers(0, 30)),  # cancel at step
)


@settings(max_examples=250, deadline=None)
@given(specs=st.lists(seq_spec, min_size=1, max_size=12), pool_tokens=st.one_of(st.integers(24, 64), st.integers(64, 160)),
       block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 40),
       chunk=st.one_of(st.none(), st.integers(1, 9)), max_seqs=st.integers(1, 6),
       caching=st.booleans(), min_shared=st.sampled_from([1, 4, 8]), behind=st.booleans())
def test_random_workloads_match_each_sequence_run_alone(
        specs: list, pool_tokens: int, block_size: int, budget: int, chunk: int | None, max_seqs: int,
        caching: bool, min_shared: int, behind: bool) -> None:
    s = Scheduler(max(1, pool_tokens // block_size), block_size, max_model_len=48, max_num_batched_tokens=budget,
                  max_prefill_chunk=chunk, max_num_seqs=max_seqs, min_shared_tokens=min_shared,
                  enable_prefix_caching=caching)
    eng = FakeEngine(s, behind=behind)
    want: dict[str, tuple[list[int], int, int | None]] = {}
    arrivals: dict[int, list[str]] = {}
    cancels: dict[int, list[str]] = {}
    for i, (doc, take, own, max_new, at, cancel_at) in enumerate(specs):
        prefix = DOCS[doc][:take] if doc < 3 else []
        prompt = prefix + own
        if max_new == 0:  # scoring: the prefix then a continuation of >= 1 token
            score_from = max(len(prompt) - len(own), 1) - 1
            want[f"s{i}"] = (prompt, 0, score_from)
        else:
            want[f"s{i}"] = (prompt, max_new, None)
        arrivals.setdefault(at, []).append(f"s{i}")
        if cancel_at is not None:
            cancels.setdefault(cancel_at, []).append(f"s{i}")
    canceled: set[str] = set()
    while arrivals or eng.has_work():
        for sid in arrivals.pop(eng.steps, []):
            prompt, max_new, score_from = want[sid]
            eng.add(sid, prompt, max_new, score_from)
        for sid in cancels.pop(eng.steps, []):
            if s.finish(sid, "canceled") is not None:
                canceled.add(sid)
                assert s.get(sid) is None and s.finish(sid, "canceled") is None
        if eng.has_work():
            eng.step()
        else:
            eng.steps += 1
        assert eng.steps < 5000, "no progress"
    check_results(eng, want, canceled)


@pytest.mark.parametrize("behind", [False, True])
def test_thousands_of_random_operations_under_a_tiny_pool(behind: bool) -> None:
    """Seeded long runs: many overlapping requests on shared documents, a pool that forces
    preemption, random cancels; every step checked, no leak at the end. Behind: the host learns each
    step's tokens one step late (async steps): preemptions and cancels then hit sequences whose token
    is in flight."""
    total = {"preemptions": 0, "prefix_hit_tokens": 0, "steps": 0, "groups": 0, "in_flight_preempted": 0}
    for seed in range(6):
        rng = random.Random(seed)
        s = Scheduler(14, 4, max_model_len=48, max_num_batched_tokens=rng.choice([8, 16, 32]),
                      max_prefill_chunk=rng.choice([None, 4, 8]), max_num_seqs=5, min_shared_tokens=8)
        eng = FakeEngine(s, behind=behind)
        want: dict[str, tuple[list[int], int, int | None]] = {}
        canceled: set[str] = set()
        for i in range(80):
            doc = DOCS[rng.randrange(3)][: rng.randrange(8, 30)]
            own = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 5))]
            sid = f"{seed}-{i}"
            if rng.random() < 0.25:
                want[sid] = (doc + own, 0, len(doc) - 1)
            else:
                want[sid] = (doc + own, rng.randrange(1, 14), None)
            eng.add(sid, *want[sid])
            for _ in range(rng.randrange(0, 4)):
                if eng.has_work():
                    out = eng.step()
                    total["groups"] += len(out.prefix_groups)

            if rng.random() < 0.1:
                victim = f"{seed}-{rng.randrange(i + 1)}"
                if s.finish(victim, "canceled") is not None:
                    canceled.add(victim)
        eng.run()
        check_results(eng, want, canceled)
        total["in_flight_preempted"] += eng.in_flight_preempted
        for k in ("preemptions", "prefix_hit_tokens"):
            total[k] += s.stats()[k]
        total["steps"] += eng.steps
    assert total["preemptions"] > 0 and total["prefix_hit_tokens"] > 0 and total["groups"] > 0, total
    assert total["steps"] > 1000, total
    assert (total["in_flight_preempted"] > 0) == behind, total


def test_second_sequence_on_the_same_tokens_hits_the_cache_after_the_first_finished() -> None:
    s = Scheduler(32, 4, max_model_len=64)
    eng = FakeEngine(s)
    prompt = DOCS[0][:23]  # 5 full blocks + 3 tokens
    eng.add("a", prompt, 3)
    eng.run()
    assert s.stats()["blocks_used"] == 0 and s.stats()["prefix_hit_tokens"] == 0
    b = eng.add("b", prompt, 3)
    eng.step()
    assert b.num_cached == 20 == (b.logits_from // 4) * 4
    c = eng.add("c", DOCS[0][:24], 2)  # 6 full blocks, but position 23 needs logits: 5 cached
    eng.step()
    assert c.num_cached == 20
    d = eng.add("d", DOCS[0][:20], 0, score_from=9)  # scoring: cached up to its first scored position
    eng.run()
    assert d.num_cached == 8 and d.finish_reason == "scored"
    assert eng.results["b"] == eng.results["a"] == alone(prompt, 3, None)
    assert s.stats()["prefix_hit_tokens"] == 48
    check_results(eng, {k: (v.token_ids[: v.prompt_len], v.max_new_tokens, v.score_from)
                        for k, v in {"b": b, "c": c, "d": d}.items()})


def test_pending_prefix_waits_for_the_first_prefill_and_does_not_block_others() -> None:
    bs = 4
    s = Scheduler(64, bs, max_model_len=128, max_num_batched_tokens=64, max_prefill_chunk=12)
    eng = FakeEngine(s)
    doc = [(3 * i) % (VOCAB - 1) + 1 for i in range(40)]  # 10 full blocks
    a = eng.add("a", [*doc, 5, 6], 4)
    b = eng.add("b", [*doc, 7, 8, 9], 4)
    c = eng.add("c", [11, 12, 13], 4)  # another document, behind b in the queue
    out = eng.step()
    assert [p.seq.seq_id for p in out.prefills] == ["a", "c"]  # b waits, c does not wait behind it
    while b.status is SeqStatus.WAITING:
        computed_before = a.num_computed
        out = eng.step()
        if "b" in [p.seq.seq_id for p in out.prefills]:
            assert computed_before >= 40  # admitted only once a's document blocks were computed
    assert b.num_cached == 40 and b.block_ids[:10] == a.block_ids[:10]
    eng.run()
    assert s.stats()["prefix_hit_tokens"] == 40
    for seq in (a, b, c):
        assert eng.results[seq.seq_id] == alone(seq.token_ids[: seq.prompt_len], 4, None)


def test_preemption_under_a_tiny_pool_recomputes_the_same_tokens() -> None:
    s = Scheduler(8, 2, max_model_len=16, max_num_batched_tokens=16, max_num_seqs=4)
    eng = FakeEngine(s)
    want = {f"p{i}": ([i + 1, i + 2, i + 3, i + 4, i + 5], 10, None) for i in range(4)}
    seqs = [eng.add(sid, *spec) for sid, spec in want.items()]
    while s.has_work():
        out = eng.step()
        if out.preempted:  # the victims go back to the front of the queue, oldest first
            front = [q.seq_id for q in list(s._waiting)[: len(out.preempted)]]
            assert front == sorted(out.preempted, key=lambda sid: s.get(sid).arrival)  # type: ignore[union-attr]
    assert s.stats()["preemptions"] > 0 and any(q.num_preemptions for q in seqs)
    assert seqs[0].num_preemptions == 0  # the oldest is never the victim while others run
    check_results(eng, want)
    assert all(eng.results[q.seq_id][1] in ("eos", "length") for q in seqs)


def test_finished_sequence_tail_is_evicted_before_its_head() -> None:
    s = Scheduler(8, 4, max_model_len=64)
    eng = FakeEngine(s)
    eng.add("a", DOCS[0][:24], 1)  # 6 full blocks, all computed and cached
    eng.run()
    assert s.stats()["blocks_cached"] == 6
    eng.add("b", DOCS[1][:16], 1)  # 4 blocks: the 2 never used, then 2 evicted
    eng.run()
    c = eng.add("c", DOCS[0][:24], 1)
    eng.step()
    assert c.num_cached == 16  # a's head (blocks 0-3) survived, its tail went first


def test_token_budget_and_chunk_limits() -> None:
    s = Scheduler(200, 4, max_model_len=400, max_num_batched_tokens=20, max_prefill_chunk=7, max_num_seqs=3)
    eng = FakeEngine(s)
    for i in range(5):
        eng.add(f"t{i}", [i + 1] * 50, 5)
    out = eng.step()
    assert [(p.seq.seq_id, p.start, p.num_tokens) for p in out.prefills] == [("t0", 0, 7), ("t1", 0, 7),
                                                                            ("t2", 0, 6)]
    assert s.stats()["running"] == 3 and s.stats()["waiting"] == 2
    eng.run()  # check_plan asserts the limits on every step
    assert s.stats()["tokens_scheduled"] == 5 * 50 + sum(len(r[0]) - 1 for r in eng.results.values())


def test_too_long_is_finished_at_once_and_reported() -> None:
    s = Scheduler(4, 4, max_model_len=32)
    long_ctx = Sequence(seq_id="x", token_ids=[1] * 30, prompt_len=30, max_new_tokens=3)
    big_pool = Sequence(seq_id="y", token_ids=[1] * 14, prompt_len=14, max_new_tokens=3)  # 5 blocks > 4
    ok = Sequence(seq_id="z", token_ids=[1] * 13, prompt_len=13, max_new_tokens=3)  # 4 blocks
    for q in (long_ctx, big_pool, ok):
        s.add(q)
    assert s.has_work() and s.get("x") is None and s.finish("x", "canceled") is None
    out = s.schedule()
    assert [(q.seq_id, q.finish_reason) for q in out.finished] == [("x", "too_long"), ("y", "too_long")]
    assert [p.seq.seq_id for p in out.prefills] == ["z"]
    assert s.schedule().finished == []


def test_cancel_waiting_and_running() -> None:
    s = Scheduler(16, 4, max_model_len=64, max_num_seqs=1)
    eng = FakeEngine(s)
    run, wait = eng.add("r", DOCS[1][:10], 5), eng.add("w", DOCS[2][:10], 5)
    eng.step()
    assert run.status is SeqStatus.RUNNING and wait.status is SeqStatus.WAITING
    assert s.stats()["blocks_used"] == 3
    assert s.finish("w", "canceled") is wait and wait.finish_reason == "canceled"
    assert s.finish("r", "canceled") is run and run.status is SeqStatus.FINISHED
    assert s.finish("r", "canceled") is None and s.finish("nope", "canceled") is None
    assert not s.has_work() and s.stats()["blocks_used"] == 0 and s.kv.num_free == 16
    s.update(SchedulerOutput())  # an in-flight plan of a canceled sequence is ignored
    s.kv.pool.check()


def test_prefix_groups_from_the_scheduler_and_the_split() -> None:
    s = Scheduler(64, 4, max_model_len=128, min_shared_tokens=16)
    eng = FakeEngine(s)
    doc = DOCS[0][:24]  # 6 full blocks
    members = [eng.add(f"g{i}", [*doc, i + 1], 6) for i in range(3)]
    eng.add("solo", DOCS[1][:24], 6)
    eng.add("short", [*doc[:10]], 6)  # shares only 2 blocks (< 16 tokens)
    groups = []
    while not groups:
        groups = eng.step().prefix_groups
    (g,) = groups
    assert g.seq_ids == ["g0", "g1", "g2"] and g.block_ids == members[0].block_ids[:6] and g.num_tokens == 24
    # a sub-group sharing 2 more blocks does not split the document-wide group: 5*10 saved > 1*12 + 3*10
    tables = [(f"s{i}", list(range(10)) + [100 + i]) for i in range(4)]
    tables += [("t0", [*range(10), 50, 51, 52]), ("t1", [*range(10), 50, 51, 53])]
    (big,) = prefix_groups(tables, 1, 4)
    assert big.seq_ids == ["s0", "s1", "s2", "s3", "t0", "t1"] and big.block_ids == list(range(10))
    # but two documents behind one shared first block form two groups
    tables = [(f"a{i}", [0, *range(10, 20), i]) for i in range(2)] + [(f"b{i}", [0, *range(30, 40), i])
                                                                     for i in range(3)]
    ga, gb = prefix_groups(tables, 1, 4)
    assert ga.seq_ids == ["a0", "a1"] and len(ga.block_ids) == 11
    assert gb.seq_ids == ["b0", "b1", "b2"] and len(gb.block_ids) == 11
    assert prefix_groups([("x", [1, 2]), ("y", [1, 2])], 4, 16) == []  # too little shared


def test_core_does_not_import_torch() -> None:
    code = ("import sys, pipeline.engine.core.scheduler, pipeline.engine.core.requests;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
