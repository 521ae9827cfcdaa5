"""Block tables per sequence over one BlockPool: prefix-cache lookup, slots for new tokens, registering
computed blocks, freeing (in the manner of vLLM v1's vllm/v1/core/kv_cache_manager.py).

A sequence's full blocks get chained content keys (`hash_block`), computed once per sequence and
extended as tokens are appended (token ids only ever grow). The manager keeps no per-sequence state
beyond those keys: the block table and the computed count live on the sequence itself, so the
scheduler and the runner read one object.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from pipeline.engine.core.block_pool import BlockPool, hash_block


class SeqLike(Protocol):
    """What the manager needs of a sequence (pipeline.engine.core.scheduler.Sequence)."""

    seq_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_computed: int


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._keys: dict[str, list[int]] = {}  # seq id -> keys of its full blocks (by token content)

    # --- content keys -------------------------------------------------------------------------

    def block_keys(self, seq: SeqLike) -> list[int]:
        """Keys of every full block of the sequence's tokens (computed or not)."""
        keys = self._keys.setdefault(seq.seq_id, [])
        bs, ids = self.block_size, seq.token_ids
        while (len(keys) + 1) * bs <= len(ids):
            i = len(keys)
            keys.append(hash_block(keys[-1] if keys else None, ids[i * bs : (i + 1) * bs]))
        return keys

    def forget(self, seq_id: str) -> None:
        """Drop a finished sequence's keys (a preempted one keeps them: its tokens are unchanged)."""
        self._keys.pop(seq_id, None)

    # --- prefix cache -------------------------------------------------------------------------

    def cached_prefix(self, seq: SeqLike, max_tokens: int) -> list[int]:
        """The longest run of cached blocks matching the sequence's leading full blocks, at most
        max_tokens tokens (whole blocks only: a hit never ends inside a block, so a partly reused
        block is never written into). Takes no references."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        for key in self.block_keys(seq)[: max_tokens // self.block_size]:
            b = self.pool.lookup(key)
            if b is None:
                break
            out.append(b)
        return out

    def pending_keys(self, running: Iterable[SeqLike]) -> set[int]:
        """Keys of full blocks some running sequence has not computed yet: another sequence on the same
        tokens should wait for them rather than compute them a second time."""
        if not self.enable_prefix_caching:
            return set()
        out: set[int] = set()
        for seq in running:
            out.update(self.block_keys(seq)[seq.num_computed // self.block_size :])
        return out

    # --- block tables -------------------------------------------------------------------------

    def can_admit(self, cached: list[int], num_tokens: int) -> bool:
        """Whether a sequence holding no blocks can take the cached blocks and get the rest of the
        blocks for its first num_tokens positions. Unheld cached blocks count in num_free but stop
        being allocatable once taken, so they are subtracted."""
        need = blocks_for(num_tokens, self.block_size) - len(cached)
        unheld = sum(self.pool.ref_count(b) == 0 for b in cached)
        return need <= self.pool.num_free - unheld

    def admit(self, seq: SeqLike, cached: list[int], num_tokens: int) -> bool:
        """Give a blockless sequence the cached blocks (as computed) plus fresh blocks up to num_tokens
        positions. False, and nothing changed, if the pool is short."""
        assert not seq.block_ids, f"{seq.seq_id} already holds blocks"
        if not self.can_admit(cached, num_tokens):
            return False
        self.pool.ref(cached)
        seq.block_ids.extend(cached)
        seq.num_computed = len(cached) * self.block_size
        ok = self.allocate(seq, num_tokens)
        assert ok, "can_admit promised the blocks"
        return True

    def allocate(self, seq: SeqLike, num_tokens: int) -> bool:
        """Blocks so that positions [0, num_tokens) have slots. False, and nothing taken, if short."""
        need = blocks_for(num_tokens, self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        new = self.pool.allocate(need, after=seq.block_ids[-1] if seq.block_ids else None)
        if new is None:
            return False
        seq.block_ids.extend(new)
        return True

    def commit(self, seq: SeqLike, start: int, end: int) -> None:
        """Positions [start, end) were computed: register the blocks that became full by content."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, last = start // bs, end // bs
        if last <= first:
            return
        keys = self.block_keys(seq)
        for i in range(first, last):
            self.pool.cache(seq.block_ids[i], keys[i])

    def free(self, seq: SeqLike, *, clear: bool = True) -> None:
        """Release the sequence's blocks, tail first (its tail is evicted before its shared head).
        The block table is emptied in place, unless clear=False: a sequence finished while a step that
        includes it is in flight keeps its (now stale) table so that step can still run; the released
        blocks are not handed out again before the next schedule()."""
        self.pool.release(reversed(seq.block_ids))
        if clear:
            seq.block_ids.clear()

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_used(self) -> int:
        return self.pool.num_blocks - self.pool.num_free
