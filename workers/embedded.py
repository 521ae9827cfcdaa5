"""Embedded mode: the same task bodies as the Celery workers, run by in-process thread pools.

Two pools mirror the two queues: `parse` with settings.embedded_workers threads (the heavy parse
work already runs in a child process per document) and `gpu` with settings.gpu_documents_in_flight
threads, as a gpu worker has: each runs one document's jobs (workers/document_jobs.py) against the
process's one engine, so a short document never waits behind a long one.
A reaper thread (workers.reaper) recovers work left by a crashed process sharing the same DB.
The runner is embedded mode's Dispatcher (workers/dispatch.py; chosen by workers/transport.py): the
parse body and the reaper it runs send their follow-up work back to it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from uuid import UUID

from config.settings import Settings
from workers import bodies, document_jobs, reaper
from workers.failures import MAX_TRANSIENT_RETRIES, TRANSIENT_ERRORS, backoff_s

log = logging.getLogger(__name__)


class EmbeddedRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._parse_pool = ThreadPoolExecutor(max(1, settings.embedded_workers), thread_name_prefix="longdoc-parse")
        self._gpu_pool = ThreadPoolExecutor(settings.gpu_documents_in_flight, thread_name_prefix="longdoc-gpu")
        self._lock = threading.Lock()
        self._pending = {"parse": 0, "gpu": 0}
        self._reaper_stop: threading.Event | None = None
        self._reaper_thread: threading.Thread | None = None

    # --- the Dispatcher interface (workers/dispatch.py): the bodies run here are handed this runner ---

    def enqueue_parse(self, document_id: UUID) -> None:
        self._submit(self._parse_pool, "parse", bodies.parse_document, self.settings, document_id, dispatcher=self)

    def enqueue_job(self, job_id: UUID) -> None:
        self._submit(self._gpu_pool, "gpu", document_jobs.run_job, self.settings, job_id)

    def request_cancel(self, job_id: UUID) -> None:
        """Nothing to drop: a queued job's body finds it canceled; a running one stops at its next heartbeat."""

    def broker_ok(self) -> bool:
        return True  # no broker: the pools are in this process

    def queue_depths(self) -> dict[str, int]:
        """Tasks submitted to each pool and not yet started."""
        with self._lock:
            return dict(self._pending)

    def start_reaper(self) -> None:
        """Run reap + reconcile every settings.reaper_interval_s in a daemon thread (idempotent)."""
        with self._lock:
            if self._reaper_thread is not None:
                return
            self._reaper_stop = threading.Event()
            self._reaper_thread = threading.Thread(
                target=reaper.run_periodically, args=(self.settings, self._reaper_stop), kwargs={"dispatcher": self},
                name="longdoc-reaper", daemon=True)
            self._reaper_thread.start()

    def shutdown(self, wait: bool = True) -> None:
        if self._reaper_stop is not None:
            self._reaper_stop.set()
        self._parse_pool.shutdown(wait=wait, cancel_futures=not wait)
        self._gpu_pool.shutdown(wait=wait, cancel_futures=not wait)
        if self._reaper_thread is not None and wait:
            self._reaper_thread.join(timeout=5)

    def _submit(self, pool: ThreadPoolExecutor, queue: str, fn, *args, retries: int = 0,  # noqa: ANN001
                **kwargs) -> Future:
        with self._lock:
            self._pending[queue] += 1

        def run() -> None:
            with self._lock:
                self._pending[queue] -= 1
            try:
                fn(*args, **kwargs)
            except TRANSIENT_ERRORS as exc:  # same policy as the Celery tasks: back off, then try again
                if retries >= MAX_TRANSIENT_RETRIES:
                    log.error("embedded %s task gave up after %d retries (the reconciler re-sends it): %s",
                              queue, retries, exc)
                    return
                delay = backoff_s(retries)
                log.warning("embedded %s task: transient error, retry in %d s: %s", queue, delay, exc)
                timer = threading.Timer(delay, self._resubmit, args=(pool, queue, fn, args, kwargs, retries + 1))
                timer.daemon = True
                timer.start()
            except Exception:  # a body already recorded the failure in the DB; keep the pool alive
                log.exception("embedded %s task failed", queue)

        return pool.submit(run)

    def _resubmit(self, pool: ThreadPoolExecutor, queue: str, fn, args: tuple, kwargs: dict,  # noqa: ANN001
                  retries: int) -> None:
        try:
            self._submit(pool, queue, fn, *args, retries=retries, **kwargs)
        except RuntimeError:  # the pool was shut down meanwhile: the reconciler picks the work up later
            log.info("embedded %s pool closed; dropping a retry", queue)


_runners: dict[str, EmbeddedRunner] = {}
_runners_lock = threading.Lock()


def get_runner(settings: Settings) -> EmbeddedRunner:
    """One runner per database: the API and `longdoc run` in one process share its pools."""
    key = settings.effective_database_url
    with _runners_lock:
        runner = _runners.get(key)
        if runner is None:
            runner = _runners[key] = EmbeddedRunner(settings)
        return runner


def shutdown_all(wait: bool = True) -> None:
    with _runners_lock:
        runners = list(_runners.values())
        _runners.clear()
    for runner in runners:
        runner.shutdown(wait=wait)
