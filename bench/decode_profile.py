"""Kernel by kernel: what one batch-1 decode step spends on the device, the serving engine's paged
step against the dense path's graph step (bench/serving.py's `profile` stage).

torch.profiler (CUPTI) records each kernel a graph replay launches; per kernel name the table gives
launches and microseconds per step, and per path the sum of kernel time against the step's wall
time (the rest is the gaps between dependent kernels and the host). A path whose replays show no
kernels (a profiler that cannot see inside graphs) is profiled again eagerly, and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def _device_us(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def profile_steps(step: Callable[[], None], steps: int, sync: Callable[[], None], top: int = 25) -> dict:
    """Run `step` `steps` times under the profiler: kernels per step, their device time per step, the
    wall time per step, and the `top` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    rows = []
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = _device_us(event)
        if us <= 0:
            continue
        rows.append({"kernel": event.key[:90], "per_step": round(event.count / steps, 2),
                     "us_per_step": round(us / steps, 2)})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "wall_ms_per_step": round(wall / steps * 1000, 3),
            "kernels_per_step": round(sum(r["per_step"] for r in rows), 1),
            "kernel_ms_per_step": round(sum(r["us_per_step"] for r in rows) / 1000, 3),
            "top": rows[:top]}


def table(profiles: dict[str, dict]) -> list[str]:
    """One line per path, then its top kernels: the report's text."""
    lines = []
    for name, p in profiles.items():
        lines.append(f"{name}: wall {p['wall_ms_per_step']} ms/step, {p['kernels_per_step']} kernels "
                     f"{p['kernel_ms_per_step']} ms")
        lines += [f"  {r['us_per_step']:9.2f} us  x{r['per_step']:<6} {r['kernel']}" for r in p["top"][:14]]
    return lines
