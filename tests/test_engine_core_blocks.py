"""The torch-free KV block pool and KV manager (pipeline/engine/core): content keys, allocation order,
LRU eviction, reference counting under random use, prefix-cache lookup and the pending keys."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.engine.core.block_pool import BlockPool, hash_block
from pipeline.engine.core.kv_manager import KVManager

ROOT = Path(__file__).resolve().parents[1]


def test_hash_is_stable_across_processes_and_chains_the_parent() -> None:
    here = hash_block(hash_block(None, [1, 2, 3]), [4, 5, 6])
    code = ("from pipeline.engine.core.block_pool import hash_block;"
            "print(hash_block(hash_block(None, [1, 2, 3]), [4, 5, 6]))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=ROOT)
    assert int(there.stdout) == here
    assert hash_block(None, [4, 5, 6]) != here  # same tokens, different prefix: a different key
    assert hash_block(hash_block(None, [1, 2, 4]), [4, 5, 6]) != here
    assert hash_block(None, [1, 2, 3]) != hash_block(None, [1, 2, 3, 0])


def test_fresh_pool_hands_out_ascending_ids_and_extends_runs() -> None:
    pool = BlockPool(10, 4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(2, after=2) == [5, 6]  # 3 is taken: lowest free instead
    pool.release([0, 1])
    assert pool.allocate(3, after=6) == [7, 8, 9]  # the run after the caller's last block first
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) is None and pool.num_free == 0
    pool.check()


def test_lru_eviction_order_tail_first_and_ref_rescues() -> None:
    pool = BlockPool(6, 2)
    a, b = pool.allocate(3), pool.allocate(2)
    assert a == [0, 1, 2] and b == [3, 4]
    for i, blk in enumerate(a + b):
        assert pool.cache(blk, 100 + i)
    pool.release(reversed(a))  # evictable, oldest first: 2, 1, 0
    pool.release(reversed(b))  # then 4, 3
    assert pool.num_free == 6 and pool.num_evictable == 5
    pool.check()
    assert pool.allocate(2) == [5, 2]  # the never-used block first, then a's tail
    assert pool.lookup(102) is None and pool.lookup(101) == 1
    pool.ref([1])  # a prefix hit: block 1 leaves the eviction list
    assert pool.allocate(2) == [0, 4]
    assert pool.lookup(100) is None and pool.lookup(104) is None and pool.lookup(103) == 3
    assert pool.num_free == 1
    pool.check()


def test_release_errors_and_duplicate_content() -> None:
    pool = BlockPool(4, 2)
    x, y = pool.allocate(2) or []
    assert pool.cache(x, 7)
    assert not pool.cache(y, 7)  # the same content computed twice: the second stays unkeyed
    assert not pool.cache(x, 8)  # already keyed
    pool.release([x, y])
    assert pool.num_evictable == 1 and pool.num_free == 4
    with pytest.raises(ValueError):
        pool.release([y])
    with pytest.raises(ValueError):
        pool.ref([y])  # a plain free block cannot be shared
    with pytest.raises(ValueError):
        pool.cache(y, 9)  # nor registered
    pool.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 7)), max_size=120))
def test_random_pool_use_keeps_invariants(ops: list[tuple[int, int, int]]) -> None:
    pool = BlockPool(12, 2)
    holders: list[list[int]] = []
    for kind, n, key in ops:
        if kind == 0:  # allocate
            got = pool.allocate(n, after=holders[-1][-1] if holders and holders[-1] else None)
            if got is None:
                assert n > pool.num_free
            else:
                assert len(got) == n == len(set(got))
                holders.append(got)
        elif kind == 1 and holders:  # release one holder, tail first
            pool.release(reversed(holders.pop(n % len(holders))))
        elif kind == 2 and holders and holders[n % len(holders)]:  # register content
            blocks = holders[n % len(holders)]
            pool.cache(blocks[key % len(blocks)], key)
        elif kind == 3:  # a prefix hit on key
            b = pool.lookup(key)
            if b is not None:
                pool.ref([b])
                holders.append([b])
        held = {b for h in holders for b in h}
        assert pool.num_free == pool.num_blocks - len(held)
        assert all(pool.ref_count(b) == sum(h.count(b) for h in holders) for b in range(12))
        pool.check()
    for h in holders:
        pool.release(h)
    assert pool.num_free == pool.num_blocks
    pool.check()


@dataclass(eq=False)
class _Seq:
    seq_id: str
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0


def test_manager_prefix_hit_after_free_capped_at_whole_blocks() -> None:
    kv = KVManager(16, 4)
    doc = list(range(100, 118))  # 4 full blocks + 2 tokens
    a = _Seq("a", [*doc, 1, 2])
    assert kv.admit(a, [], len(a.token_ids))
    assert a.block_ids == [0, 1, 2, 3, 4] and a.num_computed == 0
    kv.commit(a, 0, len(a.token_ids))
    kv.free(a)
    kv.forget("a")
    assert kv.num_used == 0 and kv.pool.num_evictable == 5
    b = _Seq("b", [*doc, 3])
    hit = kv.cached_prefix(b, len(b.token_ids) - 1)
    assert hit == [0, 1, 2, 3]  # the 5th block holds a's own tokens: no match
    assert kv.cached_prefix(b, 15) == [0, 1, 2]  # capped: whole blocks within 15 tokens
    assert kv.admit(b, hit, len(b.token_ids))
    assert b.num_computed == 16 and b.block_ids[:4] == [0, 1, 2, 3] and len(b.block_ids) == 5
    assert kv.pool.ref_count(0) == 1
    kv.pool.check()


def test_manager_pending_keys_and_admission_counts_unheld_hits() -> None:
    kv = KVManager(6, 2)
    a = _Seq("a", list(range(10)))  # 5 full blocks
    assert kv.admit(a, [], 4)  # first chunk: positions 0..3
    assert kv.pending_keys([a]) == set(kv.block_keys(a))
    kv.commit(a, 0, 4)
    a.num_computed = 4
    assert kv.pending_keys([a]) == set(kv.block_keys(a)[2:])
    assert kv.allocate(a, 10) and len(a.block_ids) == 5
    assert not kv.allocate(a, 14)  # 7 blocks > 6
    kv.free(a)
    c = _Seq("c", list(range(10)))
    hit = kv.cached_prefix(c, 9)
    assert len(hit) == 2 and kv.num_free == 6
    # 2 unheld cached blocks + 4 more fit; asking for 5 more cannot (taking the hits removes 2 of 6)
    assert kv.can_admit(hit, 12) and not kv.can_admit(hit, 14)
    kv.pool.check()


def test_manager_without_prefix_caching_never_hits() -> None:
    kv = KVManager(8, 2, enable_prefix_caching=False)
    a = _Seq("a", list(range(6)))
    assert kv.admit(a, [], 6)
    kv.commit(a, 0, 6)
    kv.free(a)
    assert kv.pool.num_cached == 0 and kv.cached_prefix(_Seq("b", list(range(6))), 5) == []
    assert kv.pending_keys([a]) == set()
