"""Where an engine's time goes, step by step: an optional record of every step's shape and times.

Off by default (`ServingEngine.trace = StepTrace()` turns it on, as bench/tasks_mpt.py does). Per
step: when its launch began, how long the host took to queue it, how long the engine later waited
for its results, its decode rows and its prefill chunks' token counts. `summary` groups the steps by
kind (a long prefill chunk in it, only short prefill chunks, decode rows only) and charges each step
the wall time up to the next step's launch, so the kinds' walls add up to the traced span. Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

LONG_CHUNK_TOKENS = 2048  # a chunk this long or longer is a document's prefill, shorter a task's tail
ROW_BUCKETS = (1, 4, 8, 16, 32, 64)  # decode-only steps by rows (a step's time grows with the K/V they read)


@dataclass
class StepRecord:
    started: float  # perf_counter at the launch's start
    launch_s: float
    decode_rows: int
    prefill_chunks: tuple[int, ...]  # tokens per chunk
    wait_s: float = 0.0

    @property
    def kind(self) -> str:
        if any(n >= LONG_CHUNK_TOKENS for n in self.prefill_chunks):
            return "long_prefill"
        if self.prefill_chunks:
            return "short_prefills"
        return "decode"


@dataclass
class StepTrace:
    max_steps: int = 200_000  # bounded: a long-running engine keeps its first steps only
    steps: list[StepRecord] = field(default_factory=list)

    def launched(self, started: float, launch_s: float, decode_rows: int, prefill_chunks: tuple[int, ...]) -> int:
        """Record a launched step; returns its index (-1 once full) for `waited`."""
        if len(self.steps) >= self.max_steps:
            return -1
        self.steps.append(StepRecord(started, launch_s, decode_rows, prefill_chunks))
        return len(self.steps) - 1

    def waited(self, index: int, wait_s: float) -> None:
        if index >= 0:
            self.steps[index].wait_s += wait_s

    def clear(self) -> None:
        self.steps.clear()

    def summary(self, until: float | None = None) -> dict[str, Any]:
        """Per kind: steps, wall (launch start to the next launch's start; the last step's up to
        `until`, by default now), launch and wait seconds, decode rows and prefill tokens per step;
        and decode-only steps by their rows (ROW_BUCKETS, "<=N"; more rows than the last: ">N")."""
        until = time.perf_counter() if until is None else until
        out: dict[str, dict[str, float]] = {}
        names = [f"<={n}" for n in ROW_BUCKETS] + [f">{ROW_BUCKETS[-1]}"]
        by_rows: dict[str, list[float]] = {name: [] for name in names}  # in bucket order
        for i, step in enumerate(self.steps):
            end = self.steps[i + 1].started if i + 1 < len(self.steps) else until
            wall = max(0.0, end - step.started)
            if step.kind == "decode":
                by_rows[next((name for n, name in zip(ROW_BUCKETS, names[:-1], strict=True) if step.decode_rows <= n), names[-1])].append(wall)
            row = out.setdefault(step.kind, {"steps": 0, "wall_s": 0.0, "launch_s": 0.0, "wait_s": 0.0,
                                             "decode_rows": 0, "prefill_tokens": 0, "prefill_chunks": 0})
            row["steps"] += 1
            row["wall_s"] += wall
            row["launch_s"] += step.launch_s
            row["wait_s"] += step.wait_s
            row["decode_rows"] += step.decode_rows
            row["prefill_tokens"] += sum(step.prefill_chunks)
            row["prefill_chunks"] += len(step.prefill_chunks)
        for row in out.values():
            n = row["steps"]
            row["ms_per_step"] = round(row["wall_s"] / n * 1000, 3)
            row["rows_per_step"] = round(row["decode_rows"] / n, 2)
            for key in ("wall_s", "launch_s", "wait_s"):
                row[key] = round(row[key], 3)
        span = until - self.steps[0].started if self.steps else 0.0
        decode_by_rows = {k: {"steps": len(v), "wall_s": round(sum(v), 3), "ms_per_step": round(sum(v) / len(v) * 1000, 3)}
                          for k, v in by_rows.items() if v}
        return {"span_s": round(span, 3), "kinds": out, "decode_by_rows": decode_by_rows}
