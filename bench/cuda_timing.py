"""GPU timing shared by the bench scripts: event-timed medians, eager or replayed from a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median of `reps` event-timed runs of fn after `warmup` untimed ones (milliseconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def graph_time_us(
    calls: Sequence[Callable[[], Any]], replays: int, before_capture: Callable[[], None] | None = None
) -> float:
    """Median microseconds per call of `calls` captured back to back in one CUDA graph (as a decode
    step replays them), over `replays` replays. The first two calls run once on a side stream first
    (JIT, allocator); `before_capture` runs between that warm-up and the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    per_call_ms = time_ms(graph.replay, replays, warmup=0) / len(calls)
    del graph
    return per_call_ms * 1000
