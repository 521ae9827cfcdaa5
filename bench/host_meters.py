"""Meters for bench/tasks_host.py: what each serving-engine step cost the host, and the job threads' CPU.

StepMeter wraps one engine's step() and its runner's launch() and _capture(), and fa4's windowed-plan
generator (one host sync per windowed attention call), and records per step:
  wall_ms    inside ServingEngine.step
  cpu_ms     the engine thread's CPU time in it (time.thread_time); wall - cpu is time the thread
             waited: for the device (CUDA), the GIL, or a CPU core on a loaded machine
  forwards   model forwards launched: one per prefill chunk (one for all with batch_prefills), one for all
             decode rows
  chunks     prefill chunks; synced: windowed fa4 attention calls (each waits for the device);
  captured   seconds spent capturing CUDA graphs in it
JobMeter sums each job thread's CPU time (pure-Python work there holds the GIL the engine needs).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Step:
    at_s: float
    wall_ms: float
    cpu_ms: float
    forwards: int
    chunks: int
    synced: int
    captured_s: float


class StepMeter:
    def __init__(self, serving: Any, profile: bool = False) -> None:
        self.steps: list[Step] = []
        self.prof = cProfile.Profile() if profile else None
        self.t0 = time.perf_counter()
        self._now = Step(0.0, 0.0, 0.0, 0, 0, 0, 0.0)
        step, runner = serving.step, serving.runner
        launch, capture = runner.launch, runner._capture

        def counted_launch(out: Any, sampling: Any) -> Any:
            together = runner.batch_prefills and len(out.prefills) > 1  # one forward for all chunks
            self._now.forwards += (1 if together else len(out.prefills)) + (1 if out.decodes else 0)
            self._now.chunks += len(out.prefills)
            return launch(out, sampling)

        def timed_capture(inputs: Any) -> None:
            c0 = time.perf_counter()
            try:
                capture(inputs)
            finally:
                self._now.captured_s += time.perf_counter() - c0

        def measured_step() -> None:
            self._now = Step(0.0, 0.0, 0.0, 0, 0, 0, 0.0)
            w0, c0 = time.perf_counter(), time.thread_time()
            if self.prof is not None:
                self.prof.enable()
            try:
                step()
            finally:
                if self.prof is not None:
                    self.prof.disable()
                s = self._now
                s.at_s, s.wall_ms, s.cpu_ms = w0 - self.t0, (time.perf_counter() - w0) * 1e3, (time.thread_time() - c0) * 1e3
                self.steps.append(s)

        serving.step = measured_step
        runner.launch = counted_launch
        runner._capture = timed_capture
        self._undo = [lambda: vars(serving).pop("step", None), lambda: vars(runner).pop("launch", None),
                      lambda: vars(runner).pop("_capture", None)]
        self._count_window_syncs()

    def close(self) -> None:
        """Unwrap everything (the class methods and fa4's generator come back)."""
        for undo in self._undo:
            undo()

    def _count_window_syncs(self) -> None:
        try:
            from pipeline.engine.backends import fa4
        except ImportError:  # no fa4 module: nothing to count
            return
        groups = fa4.window_groups

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._now.synced += 1
            return groups(*args, **kwargs)

        fa4.window_groups = counted  # module global: every fa4.prefill call looks it up
        self._undo.append(lambda: setattr(fa4, "window_groups", groups))

    def summary(self) -> dict[str, Any]:
        rows = self.steps
        if not rows:
            return {}
        decode_only = [r for r in rows if r.chunks == 0]

        def mean(values: list[float]) -> float | None:
            return round(statistics.mean(values), 3) if values else None

        return {
            "steps": len(rows), "wall_ms_total": round(sum(r.wall_ms for r in rows), 1),
            "cpu_ms_total": round(sum(r.cpu_ms for r in rows), 1),
            "wall_ms_per_step": mean([r.wall_ms for r in rows]), "cpu_ms_per_step": mean([r.cpu_ms for r in rows]),
            "waited_ms_per_step": mean([r.wall_ms - r.cpu_ms for r in rows]),
            "decode_only_steps": len(decode_only), "decode_only_wall_ms": mean([r.wall_ms for r in decode_only]),
            "decode_only_cpu_ms": mean([r.cpu_ms for r in decode_only]),
            "chunk_steps_wall_ms_total": round(sum(r.wall_ms for r in rows if r.chunks), 1),
            "forwards": sum(r.forwards for r in rows), "prefill_chunks": sum(r.chunks for r in rows),
            "steps_with_chunks": sum(1 for r in rows if r.chunks), "max_chunks_in_a_step": max(r.chunks for r in rows),
            "window_syncs": sum(r.synced for r in rows), "captures_s": round(sum(r.captured_s for r in rows), 3),
            "slowest": [{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(r).items()}
                        for r in sorted(rows, key=lambda r: -r.wall_ms)[:8]],
        }

    def top(self, n: int = 25) -> str:
        if self.prof is None:
            return ""
        buf = io.StringIO()
        pstats.Stats(self.prof, stream=buf).sort_stats("tottime").print_stats(n)
        return buf.getvalue()


class JobMeter:
    """Each job thread's CPU time (and, with profile, where it goes), around DocRunner._job."""

    def __init__(self, runner: Any, profile: bool = False) -> None:
        self.cpu_s: dict[str, float] = {}
        self.stats: pstats.Stats | None = None
        self._lock = threading.Lock()
        job = runner._job

        def measured(name: str, task: str, doc: Any) -> dict[str, Any]:
            prof = cProfile.Profile() if profile else None
            c0 = time.thread_time()
            if prof is not None:
                prof.enable()
            try:
                return job(name, task, doc)
            finally:
                if prof is not None:
                    prof.disable()
                with self._lock:
                    self.cpu_s[task] = self.cpu_s.get(task, 0.0) + time.thread_time() - c0
                    if prof is not None:
                        if self.stats is None:
                            self.stats = pstats.Stats(prof)
                        else:
                            self.stats.add(prof)

        runner._job = measured

    def top(self, n: int = 25) -> str:
        if self.stats is None:
            return ""
        buf = io.StringIO()
        self.stats.stream = buf
        self.stats.sort_stats("cumulative").print_stats(n)
        return buf.getvalue()
