"""Exact ALiBi windows: how far back each head can attend before its weights are exactly 0.0.

With ALiBi, score(i, j) = scale * q_i . k_j - slope_h * (i - j). Softmax subtracts the row maximum,
which is at least the diagonal score(i, i) (the diagonal key is always visible), so a key d positions
back has a weight of at most

    exp(scale * q_i . (k_j - k_i) - slope_h * d) <= exp(2 * scale * max|q| * max|k| - slope_h * d)

by Cauchy-Schwarz. Once the exponent is below -150 * ln 2, the float32 exp2 a flash kernel computes
is below 2^-150 and rounds to 0.0, so the key adds exactly nothing to the row sum or the output:
skipping it changes no bit of that kernel's result (flash kernels visit the diagonal block first, so
the running maximum is already >= score(i, i) when far blocks are reached; checked on the H200). Steep-slope heads therefore only need the last
few hundred keys; StoryWriter's 32 heads (alibi_bias_max 16) at 65,536 tokens need about 60% of the
causal work.

The bound uses the actual activations (per-head max norms of this call's q and k), so it holds for
any checkpoint; it only costs two norm reductions and one device->host copy per call.

Flash kernels take one window per call, so heads are grouped into contiguous ranges, each run with
the largest window of its range (`plan_groups` picks the ranges that minimise work plus a per-call
cost).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.engine.backends.head_norms import head_norm_max

# exp2(x) < 2^-150 rounds to 0.0 in float32 (smallest subnormal 2^-149, round to nearest), ex2.approx
# included; one nat of slack covers float32 rounding of scores up to |slope * d| ~ 5e4.
UNDERFLOW_NATS = 150 * math.log(2.0) + 1.0
# A kernel launch plus its tail wave, in score elements (q x k pairs) at flash-attn-4's H200 rate
# (~1.1e6 per us): ~30 us. Keeps short prompts from being split into many tiny calls.
CALL_COST_ELEMENTS = 3.0e7


@dataclass(frozen=True)
class HeadGroup:
    """Heads [start, stop) run in one call; window None = plain causal (no key is negligible)."""

    start: int
    stop: int
    window: int | None


def head_windows(q: torch.Tensor, k: torch.Tensor, slopes: torch.Tensor, *, scale: float) -> list[int]:
    """Per head, the key distance beyond which every ALiBi weight is exactly 0.0 in float32.

    q [B, Tq, H, D], k [B, Tk, H, D]; slopes [H] > 0. One host sync (the result is a Python list).
    """
    return head_windows_async(q, k, slopes, scale=scale).get()


class PendingWindows:
    """head_windows' result on its way to the host: the device->host copy is queued without blocking,
    and `get` waits for that copy only, not for work queued on the stream after it."""

    def __init__(self, windows: torch.Tensor) -> None:
        self._ready: torch.cuda.Event | None = None
        if windows.is_cuda:
            self._host = torch.empty(windows.shape, dtype=windows.dtype, pin_memory=True)
            self._host.copy_(windows, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = windows

    def get(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return [int(w) for w in self._host.tolist()]


def head_windows_async(q: torch.Tensor, k: torch.Tensor, slopes: torch.Tensor, *, scale: float) -> PendingWindows:
    """head_windows without the host sync: queues the norm reductions and the copy, returns at once."""
    q_max, k_max = head_norm_max(q), head_norm_max(k)  # [H] each
    reach = 2.0 * scale * q_max.double() * k_max.double() + UNDERFLOW_NATS  # nats  [H]
    windows = torch.ceil(reach / slopes.to(reach.device, torch.float64))  # [H]
    # non-finite norms (inf/NaN activations) must never shrink a window: treat as unbounded
    windows = torch.where(torch.isfinite(windows), windows, torch.full_like(windows, 2.0**62))
    return PendingWindows(windows.clamp(max=2.0**62).to(torch.int64))


def always_full_from(slopes: list[float], tk: int) -> int:
    """First head of the longest run of trailing heads whose window covers all `tk` keys for any
    activations (zero norms give the shortest reach, UNDERFLOW_NATS / slope): they need no plan."""
    start = len(slopes)
    while start > 0 and (slopes[start - 1] <= 0 or UNDERFLOW_NATS / slopes[start - 1] >= tk - 1):
        start -= 1
    return start


def causal_work(window: int | None, tq: int, tk: int) -> int:
    """Score elements one head computes: queries at positions [tk - tq, tk), each seeing keys
    [max(0, p - window), p]."""
    first = tk - tq
    if window is None or window >= tk - 1:
        return sum_range(first + 1, tk + 1)  # query at p sees p + 1 keys
    # positions p <= window see p + 1 keys; later ones see window + 1
    cut = min(max(window + 1, first), tk)  # first position that is window-limited
    return sum_range(first + 1, cut + 1) + (tk - cut) * (window + 1)


def sum_range(lo: int, hi: int) -> int:
    """lo + (lo + 1) + ... + (hi - 1); 0 when hi <= lo."""
    return (hi - lo) * (lo + hi - 1) // 2 if hi > lo else 0


GROUP_ALIGN = 4  # heads: group starts on this grid (<= heads / 4 kernel compiles per slope set)


def plan_groups(
    windows: list[int], tq: int, tk: int, *, call_cost: float | None = None, align: int = 1
) -> list[HeadGroup]:
    """Split heads into contiguous groups minimising sum(heads x work(max window)) + calls x call_cost
    (default CALL_COST_ELEMENTS). With `align`, groups start only at multiples of it: flash-attn-4
    compiles one kernel per group start (its ALiBi slope offset is compile-time), so free starts would
    compile anew whenever the activations move a boundary (seconds each, per new document).

    Windows at or beyond the whole key range become None (plain causal). Exact dynamic programme over
    contiguous partitions (H^2 group evaluations; H <= a few hundred).
    """
    call_cost = CALL_COST_ELEMENTS if call_cost is None else call_cost
    n = len(windows)
    capped: list[int | None] = [None if w >= tk - 1 else w for w in windows]
    work: dict[int | None, int] = {}  # the plan runs between two kernels with the GPU idle: keep it cheap

    def head_work(window: int | None) -> int:
        if window not in work:
            work[window] = causal_work(window, tq, tk)
        return work[window]

    best = [0.0] + [math.inf] * n  # best[i]: cost of heads [0, i)
    choice: list[tuple[int, int | None]] = [(0, None)] * (n + 1)  # (start, window) of the last group
    bounds = sorted({*range(0, n, max(1, align)), n})
    for stop in bounds[1:]:
        window: int | None = -1  # running max of capped[start:stop]; None (unbounded) absorbs
        for start in range(stop - 1, -1, -1):
            w = capped[start]
            window = None if window is None or w is None else max(window, w)
            if start % max(1, align):
                continue
            cost = best[start] + call_cost + (stop - start) * head_work(window)
            if cost < best[stop]:
                best[stop], choice[stop] = cost, (start, window)
    groups: list[HeadGroup] = []
    stop = n
    while stop > 0:
        start, window = choice[stop]
        groups.append(HeadGroup(start, stop, window))
        stop = start
    return groups[::-1]


def group_align(heads: int) -> int:
    """The grid head groups start on: GROUP_ALIGN, or 1 for few heads (few starts anyway)."""
    return GROUP_ALIGN if heads >= 4 * GROUP_ALIGN else 1


def group_starts(heads: int) -> list[int]:
    """Every head a group of a windowed plan can start at (each one a kernel of its own in flash-attn-4)."""
    return list(range(0, heads, group_align(heads)))


def window_groups(
    q: torch.Tensor, k: torch.Tensor, slopes: torch.Tensor, host_slopes: list[float], *, scale: float
) -> Iterator[HeadGroup]:
    """The head groups of one windowed call, in launch order. The other heads' norms are queued first;
    then the trailing heads that see every key whatever the activations come, as one plain causal
    group; only then does this generator wait for the norms on the host. A caller that launches each
    group as it is yielded keeps the GPU busy with that group while the host waits and plans (the
    wait covers the norms alone, not the group queued after them). q [B, Tq, H, D], k [B, Tk, H, D];
    host_slopes = slopes as a list."""
    heads, tq, tk = q.shape[2], q.shape[1], k.shape[1]
    # rounded up to the group grid: a few full heads more in the planned part keep every launch's
    # first head on the grid (their windows come out unbounded, the same causal work)
    align = group_align(heads)
    planned = min(heads, -(-always_full_from(host_slopes, tk) // align) * align)
    first = slice(0, planned)
    pending = head_windows_async(q[:, :, first], k[:, :, first], slopes[first], scale=scale) if planned else None
    if planned < heads:
        yield HeadGroup(planned, heads, None)
    if pending is not None:
        yield from plan_groups(pending.get(), tq, tk, align=align)


def work_fraction(groups: list[HeadGroup], tq: int, tk: int) -> float:
    """Score elements computed under `groups` / plain causal for every head (for logs and benches)."""
    full = causal_work(None, tq, tk)
    heads = sum(g.stop - g.start for g in groups)
    done = sum((g.stop - g.start) * causal_work(g.window, tq, tk) for g in groups)
    return done / (heads * full) if heads and full else 1.0
