"""Progress reporting shared by the task strategies: a job-wide callback and per-stage scaling."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]
REPORT_STEP = 0.05  # report every 5% of a stage: a canceled job stops at its next report (workers throttle DB writes)


def scaled(progress: Progress, start: float, end: float, stage: str) -> Callable[[float], None]:
    """A per-stage callback (fraction 0..1 of the stage) mapped onto [start, end] of the whole job."""
    last = [-1.0]
    progress(start, stage)

    def report(fraction: float) -> None:
        if fraction - last[0] >= REPORT_STEP or fraction >= 1.0 > last[0]:
            last[0] = fraction
            progress(start + (end - start) * min(fraction, 1.0), stage)

    return report
