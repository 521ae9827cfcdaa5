"""Which decoding sequences read a shared prefix together (cascade / shared-prefix attention).

Sequences on one document hold the same physical blocks at the head of their block tables (prefix-cache
hits), so the runner can compute attention over those blocks once for the whole group and merge each
member's own suffix part by log-sum-exp. Each sequence joins at most one group; a group of m members
sharing d blocks saves (m - 1) * d block reads per layer, and the split maximizes that total (a small
sub-group sharing two more blocks must not pull its members away from the document-wide group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PrefixGroup:
    block_ids: list[int]  # the shared leading blocks (full and computed)
    num_tokens: int  # len(block_ids) * block_size
    seq_ids: list[str]  # >= 2 members, in the order of the step's decodes


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two block tables, by bisection over slice equality (the
    comparisons run in C: tables of 64K-token documents hold thousands of blocks)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def prefix_groups(tables: Sequence[tuple[str, list[int]]], block_size: int,
                  min_shared_tokens: int) -> list[PrefixGroup]:
    """Groups over (seq id, shareable leading blocks) pairs: each group shares >= min_shared_tokens
    tokens and has >= 2 members. Deterministic: the same tables give the same groups."""
    min_blocks = max(1, -(-min_shared_tokens // block_size))
    order = {sid: i for i, (sid, _) in enumerate(tables)}
    buckets: dict[int, list[tuple[str, list[int]]]] = {}
    for sid, blocks in tables:
        if len(blocks) >= min_blocks:
            buckets.setdefault(blocks[0], []).append((sid, blocks))
    groups: list[PrefixGroup] = []
    for members in buckets.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: (tuple(m[1]), order[m[0]]))
        lcps = [_lcp(members[i][1], members[i + 1][1]) for i in range(len(members) - 1)]
        for lo, hi, d in _best_split(lcps, 0, len(members), min_blocks)[1]:
            sids = sorted((members[i][0] for i in range(lo, hi)), key=order.__getitem__)
            groups.append(PrefixGroup(list(members[lo][1][:d]), d * block_size, sids))
    groups.sort(key=lambda g: order[g.seq_ids[0]])
    return groups


def _best_split(lcps: list[int], lo: int, hi: int, min_blocks: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(blocks saved, groups as (lo, hi, shared blocks)) for sorted members [lo, hi): either one group at
    their common prefix, or the best splits of the sub-ranges that share more."""
    if hi - lo < 2:
        return 0, []
    d = min(lcps[lo : hi - 1])
    own = (hi - lo - 1) * d if d >= min_blocks else 0
    saved, parts, start = 0, [], lo
    for i in range(lo, hi):
        if i == hi - 1 or lcps[i] == d:  # a boundary between sub-ranges sharing more than d
            s, p = _best_split(lcps, start, i + 1, min_blocks) if i + 1 - start < hi - lo else (0, [])
            saved, parts, start = saved + s, parts + p, i + 1
    if own and own >= saved:
        return own, [(lo, hi, d)]
    return saved, parts
