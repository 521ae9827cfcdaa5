"""Small helpers shared by the task strategies: progress scaling and the engine-kind seam."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.types import PipelineError

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


def require_kind(engine, task: str) -> None:
    """The seam for the MPT strategies: until they exist, only the extractive engine runs tasks."""
    if getattr(engine, "kind", None) != "extractive":
        raise PipelineError("model_error", f"no {task} strategy for engine kind {getattr(engine, 'kind', None)!r}")
