"""Service mode's Dispatcher: Celery tasks sent *by name* to the `parse` / `gpu` queues (no task body
is imported here), and the broker's health and queue depths read from Redis."""

from __future__ import annotations

import logging
import uuid
from uuid import UUID

from config.settings import Settings
from workers.celery_app import get_celery
from workers.names import GPU_QUEUE, JOB_TASK, PARSE_QUEUE, PARSE_TASK, job_task_id

log = logging.getLogger(__name__)


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def enqueue_parse(self, document_id: UUID) -> None:
        get_celery(self.settings).send_task(PARSE_TASK, args=[str(document_id)], queue=PARSE_QUEUE,
                                            task_id=f"parse-{document_id}-{uuid.uuid4().hex[:8]}")

    def enqueue_job(self, job_id: UUID) -> None:
        get_celery(self.settings).send_task(JOB_TASK, args=[str(job_id)], queue=GPU_QUEUE,
                                            task_id=job_task_id(job_id))

    def request_cancel(self, job_id: UUID) -> None:
        try:
            get_celery(self.settings).control.revoke(job_task_id(job_id))
        except Exception as exc:  # the broker being down must not fail a cancel the DB already recorded
            log.warning("revoke of job %s failed (the DB cancel still holds): %s", job_id, exc)

    def broker_ok(self) -> bool:
        try:
            client = self._redis_client()
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception as exc:
            log.warning("broker ping failed: %s", exc)
            return False

    def queue_depths(self) -> dict[str, int]:
        """Raises nothing: an unreachable broker reports -1 per queue."""
        try:
            client = self._redis_client()
            try:
                prefix = self.settings.broker_key_prefix
                return {q: _redis_queue_len(client, prefix + q) for q in (PARSE_QUEUE, GPU_QUEUE)}
            finally:
                client.close()
        except Exception as exc:
            log.warning("queue depth query failed: %s", exc)
            return {PARSE_QUEUE: -1, GPU_QUEUE: -1}

    def _redis_client(self):  # noqa: ANN202  (redis.Redis; imported lazily)
        import redis

        return redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=1.0, socket_timeout=1.0)


def _redis_queue_len(client, queue: str) -> int:  # noqa: ANN001
    # kombu's Redis transport keeps one list per queue (after the global key prefix), plus
    # "<queue>\x06\x16<n>" lists for priorities.
    total = client.llen(queue)
    for priority in (3, 6, 9):
        total += client.llen(f"{queue}\x06\x16{priority}")
    return int(total)
