"""What the API (and the reaper) call after their DB commit to get work done. No torch here.

Service mode sends Celery tasks *by name* to the `parse` / `gpu` queues, so the API process never
imports the task bodies. Embedded mode (no broker configured) submits the same task bodies to an
in-process thread pool (workers.embedded).

Contract for callers: commit the row first, then call these. A job may be enqueued before its
document is parsed: the job task leaves it queued and the parse task releases it when parsing ends.
"""

from __future__ import annotations

import logging
import uuid
from uuid import UUID

from config.settings import Settings

log = logging.getLogger(__name__)

PARSE_QUEUE = "parse"
GPU_QUEUE = "gpu"
PARSE_TASK = "longdoc.parse_document"
JOB_TASK = "longdoc.run_job"
REAP_TASK = "longdoc.reap"
# Reaper ticks get their own small queue, consumed only by the `--beat` worker: behind a parse backlog
# they would wait (and expire) with the documents.
REAP_QUEUE = "reaper"


def job_task_id(job_id: UUID) -> str:
    """Deterministic Celery task id for a job, so a cancel can revoke it without a lookup."""
    return f"job-{job_id}"


def enqueue_parse(settings: Settings, document_id: UUID) -> None:
    """Parse the document (uploaded -> parsing -> parsed|failed), then release its queued jobs.

    The message carries the id only: a PDF password is stored encrypted in the row until the parse
    ends (storage/passwords.py), so a re-sent message parses as the first would.
    """
    if settings.embedded:
        from workers.embedded import get_runner

        get_runner(settings).submit_parse(document_id)
        return
    from workers.celery_app import get_celery

    get_celery(settings).send_task(PARSE_TASK, args=[str(document_id)], queue=PARSE_QUEUE,
                                   task_id=f"parse-{document_id}-{uuid.uuid4().hex[:8]}")


def enqueue_job(settings: Settings, job_id: UUID) -> None:
    """Run the job once its document is parsed (queued -> running -> succeeded|failed)."""
    if settings.embedded:
        from workers.embedded import get_runner

        get_runner(settings).submit_job(job_id)
        return
    from workers.celery_app import get_celery

    get_celery(settings).send_task(JOB_TASK, args=[str(job_id)], queue=GPU_QUEUE, task_id=job_task_id(job_id))


def request_cancel(settings: Settings, job_id: UUID) -> None:
    """Best effort: drop a not-yet-started message. The DB status (set by the caller) is authoritative;
    a running job notices it at its next progress/heartbeat and stops without writing a result."""
    if settings.embedded:
        return
    try:
        from workers.celery_app import get_celery

        get_celery(settings).control.revoke(job_task_id(job_id))
    except Exception as exc:  # the broker being down must not fail a cancel the DB already recorded
        log.warning("revoke of job %s failed (the DB cancel still holds): %s", job_id, exc)


def broker_ok(settings: Settings) -> bool:
    """True when the broker answers a ping within ~1 s (always True in embedded mode)."""
    if settings.embedded:
        return True
    try:
        client = _redis_client(settings)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:
        log.warning("broker ping failed: %s", exc)
        return False


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue (not counting ones a worker has already reserved).

    Raises nothing: an unreachable broker reports -1 per queue.
    """
    if settings.embedded:
        from workers.embedded import get_runner

        return get_runner(settings).pending()
    try:
        client = _redis_client(settings)
        try:
            prefix = settings.broker_key_prefix
            return {q: _redis_queue_len(client, prefix + q) for q in (PARSE_QUEUE, GPU_QUEUE)}
        finally:
            client.close()
    except Exception as exc:
        log.warning("queue depth query failed: %s", exc)
        return {PARSE_QUEUE: -1, GPU_QUEUE: -1}


def _redis_client(settings: Settings):  # noqa: ANN202  (redis.Redis; imported lazily)
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=1.0, socket_timeout=1.0)


def _redis_queue_len(client, queue: str) -> int:  # noqa: ANN001
    # kombu's Redis transport keeps one list per queue (after the global key prefix), plus
    # "<queue>\x06\x16<n>" lists for priorities.
    total = client.llen(queue)
    for priority in (3, 6, 9):
        total += client.llen(f"{queue}\x06\x16{priority}")
    return int(total)
