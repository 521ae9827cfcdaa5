"""The Celery app: Redis broker from settings, queues `parse` (CPU) and `gpu` (one solo worker per GPU).

Long-task settings: a message is acked only after its task returns (acks_late), is given back when the
worker process dies (reject_on_worker_lost), one message is reserved at a time (prefetch 1), and the
broker's visibility timeout is longer than the longest job so Redis does not redeliver a running task.
Lost work is recovered by the reaper from DB leases, not by trusting the broker (workers/reaper.py).
"""

from __future__ import annotations

import functools

from celery import Celery
from kombu import Exchange, Queue

from config.settings import Settings
from workers.names import GPU_QUEUE, JOB_TASK, PARSE_QUEUE, PARSE_TASK, REAP_QUEUE, REAP_TASK


def create_celery(settings: Settings) -> Celery:
    if not settings.broker_url:
        raise ValueError("service mode needs LONGDOC_BROKER_URL (a Redis URL); unset it for embedded mode")
    # The longest job may hold its message for job_lease_s per heartbeat round; never let Redis redeliver
    # a task that is still running: the timeout must exceed the parse time limit and the job lease.
    visibility = max(settings.visibility_timeout_s, int(settings.parse_timeout_s) * 2, settings.job_lease_s * 2)
    transport_options: dict[str, object] = {"visibility_timeout": visibility}
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    app = Celery("longdoc", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # One direct exchange per queue: a bare Queue("gpu") would inherit the default exchange and
        # routing key ("parse"), binding both queues to the same key.
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q)
                     for q in (PARSE_QUEUE, GPU_QUEUE, REAP_QUEUE)],
        task_default_queue=PARSE_QUEUE,
        task_routes={PARSE_TASK: {"queue": PARSE_QUEUE}, JOB_TASK: {"queue": GPU_QUEUE},
                     REAP_TASK: {"queue": REAP_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the DB, not in a Celery backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        beat_schedule={
            "longdoc-reap": {
                "task": REAP_TASK,
                "schedule": settings.reaper_interval_s,
                # A reap tick nobody picked up within one interval is superseded by the next one.
                "options": {"queue": REAP_QUEUE, "expires": settings.reaper_interval_s},
            },
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    )
    return app


@functools.lru_cache(maxsize=4)
def _celery_for(broker_url: str, settings_json: str) -> Celery:
    return create_celery(Settings.model_validate_json(settings_json))


def get_celery(settings: Settings) -> Celery:
    """A cached sending app for these settings (workers/celery_dispatch.py; no task bodies imported). The
    app a worker runs, with the tasks registered, is workers/tasks.py worker_app."""
    # The secret key is no broker setting, and dumped it is only "**********" (a SecretStr).
    return _celery_for(settings.broker_url or "", settings.model_dump_json(exclude={"secret_key"}))
