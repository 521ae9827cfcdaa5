"""The KV block pool: which of the device's fixed-size KV blocks are free, held, or cached by content.

In the manner of vLLM v1's prefix caching (vllm/v1/core/block_pool.py): a full, computed block is keyed
by `hash_block(parent key, its token ids)`, so the key names the whole token prefix up to the block's
end and a later sequence on the same document finds the blocks by walking its own keys. A block whose
last holder released it keeps its key and goes onto a least-recently-used list; it is still allocatable
(`num_free` counts it) and is only evicted, losing its key, when no never-used or plain free block is
left. Torch-free: the pool deals in block ids, the runner owns the tensors.

Plain free blocks are handed out lowest id first, and `allocate(n, after=b)` first tries b+1, b+2, ...,
so one document's blocks are usually one ascending run of ids, which the runner reads as a slice of the
flat pool instead of gathering them.
"""

from __future__ import annotations

import hashlib
import heapq
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

_ROOT = b"longdoc-kv-root"  # the parent "key" of a sequence's first block


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """A 128-bit key of (parent block's key, this block's token ids), stable across processes (Python's
    hash() is salted per process). 128 bits keep collisions out of reach for any realistic pool."""
    tokens = array("q", token_ids)
    if sys.byteorder == "big":  # the key must not depend on the machine
        tokens.byteswap()
    h = hashlib.blake2b(digest_size=16)
    h.update(_ROOT if parent is None else parent.to_bytes(16, "little"))
    h.update(tokens.tobytes())
    return int.from_bytes(h.digest(), "little")


class BlockPool:
    """Reference-counted blocks with a content-keyed cache and LRU eviction of unheld cached blocks.

    A block is in exactly one state: plain free (refcount 0, no key), held (refcount > 0, with or
    without a key), or evictable (refcount 0, keyed, on the LRU list).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a pool needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._refs = [0] * num_blocks
        self._key: list[int | None] = [None] * num_blocks
        self._by_key: dict[int, int] = {}
        # plain free blocks: a min-heap with lazy deletion (an id taken out of order through `after`
        # stays in the heap, stale, until popped); _is_free says which entries are live
        self._is_free = bytearray(b"\x01") * num_blocks
        self._heap = list(range(num_blocks))
        self._num_plain = num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable blocks, oldest first

    # --- queries ------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: plain free ones plus unheld cached ones (evicted on demand)."""
        return self._num_plain + len(self._lru)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks findable by content (held or evictable)."""
        return len(self._by_key)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def key_of(self, block_id: int) -> int | None:
        return self._key[block_id]

    def lookup(self, h: int) -> int | None:
        """The block cached under key h, if any. Does not take a reference (call ref for that)."""
        return self._by_key.get(h)

    # --- allocation ---------------------------------------------------------------------------

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """n blocks with refcount 1, or None (and nothing taken) if fewer than n are allocatable.

        Order: the plain free run after..after+k (contiguity with the caller's last block), then plain
        free blocks lowest id first, then the least recently used cached blocks, whose keys are dropped.
        """
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if n > self.num_free:
            return None
        out: list[int] = []
        if after is not None:
            b = after + 1
            while len(out) < n and b < self.num_blocks and self._is_free[b]:
                self._take_plain(b)
                out.append(b)
                b += 1
        while len(out) < n and self._num_plain:
            b = heapq.heappop(self._heap)
            if self._is_free[b]:
                self._take_plain(b)
                out.append(b)
        while len(out) < n:
            b, _ = self._lru.popitem(last=False)
            key = self._key[b]
            assert key is not None
            del self._by_key[key]
            self._key[b] = None
            self._refs[b] = 1
            out.append(b)
        return out

    def _take_plain(self, b: int) -> None:
        self._is_free[b] = 0
        self._num_plain -= 1
        self._refs[b] = 1

    def ref(self, block_ids: Iterable[int]) -> None:
        """One more holder of each block (a prefix-cache hit); an evictable block stops being one."""
        for b in block_ids:
            if self._refs[b] == 0:
                if self._key[b] is None:
                    raise ValueError(f"block {b} is free: only held or cached blocks can be shared")
                del self._lru[b]
            self._refs[b] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """One holder fewer of each block. At zero a keyed block becomes evictable (most recently used
        end, in the order given: pass a sequence's blocks tail first so its tail is evicted first), an
        unkeyed one plain free."""
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} released more often than it was held")
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if self._key[b] is not None:
                self._lru[b] = None
            else:
                self._is_free[b] = 1
                self._num_plain += 1
                heapq.heappush(self._heap, b)
        if len(self._heap) > 2 * self.num_blocks:  # too many stale entries: rebuild from the flags
            self._heap = [b for b in range(self.num_blocks) if self._is_free[b]]

    def cache(self, block_id: int, h: int) -> bool:
        """Register a held, full, computed block under key h. Returns False (and leaves the block
        unkeyed, to go plain free on release) when another block already holds that content — two
        sequences computed the same block — or this block already has a key."""
        if self._refs[block_id] <= 0:
            raise ValueError(f"block {block_id} is not held: only a holder can register its content")
        if self._key[block_id] is not None or h in self._by_key:
            return False
        self._key[block_id] = h
        self._by_key[h] = block_id
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block's content, so the pool hands out blocks as a fresh one does (plain
        free, lowest id first). Only while no block is held: False, and nothing changed, otherwise
        (vLLM's BlockPool.reset_prefix_cache). The engine's warm-up calls it to drop its synthetic
        prefixes."""
        if self._num_plain + len(self._lru) != self.num_blocks:
            return False
        self._key = [None] * self.num_blocks
        self._by_key.clear()
        self._lru.clear()
        self._is_free = bytearray(b"\x01") * self.num_blocks
        self._heap = list(range(self.num_blocks))
        self._num_plain = self.num_blocks
        return True

    # --- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the pool's invariants (tests call this after every operation)."""
        plain = 0
        live_in_heap = set(self._heap)
        for b in range(self.num_blocks):
            refs, key, free = self._refs[b], self._key[b], self._is_free[b]
            assert refs >= 0, f"block {b}: refcount {refs}"
            if free:
                plain += 1
                assert refs == 0 and key is None, f"free block {b} is held or keyed"
                assert b in live_in_heap, f"free block {b} is missing from the free heap"
                assert b not in self._lru, f"block {b} is both free and evictable"
            elif refs == 0:
                assert key is not None and b in self._lru, f"block {b} leaked (unheld, not free)"
            else:
                assert b not in self._lru, f"held block {b} is on the eviction list"
            if key is not None:
                assert self._by_key.get(key) == b, f"block {b}'s key maps elsewhere"
        assert plain == self._num_plain, f"free count {self._num_plain} != {plain}"
        assert len(self._by_key) == sum(k is not None for k in self._key), "key map out of step"
        assert all(self._refs[b] == 0 for b in self._lru), "evictable block is held"
