"""Celery task definitions: thin wrappers that call the shared bodies with this process's settings.

Explicit names and queues (workers/names.py); only TRANSIENT_ERRORS are retried, with exponential
backoff; every other outcome is recorded in the DB by the body itself. The bodies get this process's
dispatcher (Celery, by name) for the work they send on.
"""

from __future__ import annotations

import logging

from celery import Celery, Task
from celery.signals import worker_process_init

from config.settings import Settings, get_settings
from workers import bodies, document_jobs, reaper
from workers.celery_app import create_celery
from workers.failures import MAX_TRANSIENT_RETRIES, TRANSIENT_ERRORS, backoff_s
from workers.names import GPU_QUEUE, JOB_TASK, PARSE_QUEUE, PARSE_TASK, REAP_QUEUE, REAP_TASK
from workers.transport import get_dispatcher

log = logging.getLogger(__name__)


def worker_app(settings: Settings | None = None) -> Celery:
    """The app a `longdoc worker` process runs: the sending app's configuration plus the task definitions."""
    app = create_celery(settings or get_settings())
    register_tasks(app)
    return app


@worker_process_init.connect
def _fresh_db_pool(**_kwargs: object) -> None:
    # A forked pool process must not reuse connections opened in its parent.
    from storage.db import get_engine

    get_engine.cache_clear()  # the session factories (storage/db.py) are keyed by the engine, so they follow


def register_tasks(app: Celery) -> None:
    @app.task(name=PARSE_TASK, bind=True, queue=PARSE_QUEUE, acks_late=True, reject_on_worker_lost=True,
              max_retries=MAX_TRANSIENT_RETRIES)
    def parse_document(self: Task, document_id: str, password: str | None = None) -> str:
        # `password` is accepted and ignored: messages sent before migration 0002 carried it; the body now
        # reads it from the row (such a document fails password_required, and a re-upload with it parses).
        try:
            settings = get_settings()
            return bodies.parse_document(settings, document_id, dispatcher=get_dispatcher(settings))
        except TRANSIENT_ERRORS as exc:
            log.warning("parse %s: transient error, retry %d: %s", document_id, self.request.retries + 1, exc)
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from exc

    @app.task(name=JOB_TASK, bind=True, queue=GPU_QUEUE, acks_late=True, reject_on_worker_lost=True,
              max_retries=MAX_TRANSIENT_RETRIES)
    def run_job(self: Task, job_id: str) -> str:
        try:
            return document_jobs.run_job(get_settings(), job_id)
        except TRANSIENT_ERRORS as exc:
            log.warning("job %s: transient error, retry %d: %s", job_id, self.request.retries + 1, exc)
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from exc

    @app.task(name=REAP_TASK, queue=REAP_QUEUE, ignore_result=True)
    def reap() -> dict[str, int]:
        settings = get_settings()
        return reaper.tick(settings, dispatcher=get_dispatcher(settings))
