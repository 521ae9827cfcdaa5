"""Queue and task names: what a sender and a worker must agree on, and nothing else."""

from __future__ import annotations

from uuid import UUID

PARSE_QUEUE = "parse"
GPU_QUEUE = "gpu"
# Reaper ticks get their own small queue, consumed only by the `--beat` worker: behind a parse backlog
# they would wait (and expire) with the documents.
REAP_QUEUE = "reaper"
PARSE_TASK = "longdoc.parse_document"
JOB_TASK = "longdoc.run_job"
REAP_TASK = "longdoc.reap"


def job_task_id(job_id: UUID) -> str:
    """Deterministic Celery task id for a job, so a cancel can revoke it without a lookup."""
    return f"job-{job_id}"
