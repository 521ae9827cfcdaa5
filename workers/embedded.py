"""Embedded mode: the same task bodies as the Celery workers, run by in-process thread pools.

Two pools mirror the two queues: `parse` with settings.embedded_workers threads (the heavy parse
work already runs in a child process per document) and `gpu` with one thread, because the engine is
loaded once per process and runs one job at a time, as a solo gpu worker does.
A reaper thread (workers.reaper) recovers work left by a crashed process sharing the same DB.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from uuid import UUID

from longdoc.settings import Settings

log = logging.getLogger(__name__)


class EmbeddedRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._parse_pool = ThreadPoolExecutor(max(1, settings.embedded_workers), thread_name_prefix="longdoc-parse")
        self._gpu_pool = ThreadPoolExecutor(1, thread_name_prefix="longdoc-gpu")
        self._lock = threading.Lock()
        self._pending = {"parse": 0, "gpu": 0}
        self._reaper_stop: threading.Event | None = None
        self._reaper_thread: threading.Thread | None = None

    def submit_parse(self, document_id: UUID, password: str | None = None) -> Future:
        from workers import bodies

        return self._submit(self._parse_pool, "parse", bodies.parse_document, self.settings, document_id,
                            password=password)

    def submit_job(self, job_id: UUID) -> Future:
        from workers import bodies

        return self._submit(self._gpu_pool, "gpu", bodies.run_job, self.settings, job_id)

    def pending(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pending)

    def start_reaper(self) -> None:
        """Run reap + reconcile every settings.reaper_interval_s in a daemon thread (idempotent)."""
        from workers.reaper import run_periodically

        with self._lock:
            if self._reaper_thread is not None:
                return
            self._reaper_stop = threading.Event()
            self._reaper_thread = threading.Thread(
                target=run_periodically, args=(self.settings, self._reaper_stop), name="longdoc-reaper", daemon=True)
            self._reaper_thread.start()

    def shutdown(self, wait: bool = True) -> None:
        if self._reaper_stop is not None:
            self._reaper_stop.set()
        self._parse_pool.shutdown(wait=wait, cancel_futures=not wait)
        self._gpu_pool.shutdown(wait=wait, cancel_futures=not wait)
        if self._reaper_thread is not None and wait:
            self._reaper_thread.join(timeout=5)

    def _submit(self, pool: ThreadPoolExecutor, queue: str, fn, *args, **kwargs) -> Future:  # noqa: ANN001
        with self._lock:
            self._pending[queue] += 1

        def run() -> None:
            with self._lock:
                self._pending[queue] -= 1
            try:
                fn(*args, **kwargs)
            except Exception:  # a body already recorded the failure in the DB; keep the pool alive
                log.exception("embedded %s task failed", queue)

        return pool.submit(run)


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
