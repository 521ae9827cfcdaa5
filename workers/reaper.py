"""Reaper and reconciler: the DB leases, not the broker, decide what work was lost.

- reap: running jobs / parsing documents whose lease expired (their worker vanished) are re-queued
  and re-sent, or failed with `worker_lost` after settings.max_attempts claims;
- reconcile: uploaded documents and queued jobs of parsed documents whose message was last sent
  more than settings.reconcile_grace_s ago are re-sent (the broker may have lost it), one message per
  document's jobs, and their send time is stamped, so the same work is re-sent at most once per grace
  period however short the tick interval (storage.jobs.stale_queued_jobs says why the DB and not the
  broker decides); duplicates are harmless because every task claims its row first.

Runs as the Celery beat task `longdoc.reap` (workers.tasks) in service mode and as a daemon thread
(run_periodically) in embedded mode.
"""

from __future__ import annotations

import logging
import threading

from config.settings import Settings
from storage import documents, jobs
from storage.db import session_scope
from storage.models import utcnow
from workers.dispatch import Dispatcher

log = logging.getLogger(__name__)


def tick(settings: Settings, *, dispatcher: Dispatcher) -> dict[str, int]:
    """One reap + reconcile pass; sends the recovered work after its DB changes are committed."""
    with session_scope(settings.effective_database_url) as s:
        now = utcnow()
        requeued_jobs, failed_jobs = jobs.reap_expired_jobs(s, settings.max_attempts, now)
        requeued_docs, failed_docs = documents.reap_expired_documents(s, settings.max_attempts, now)
    with session_scope(settings.effective_database_url) as s:
        now = utcnow()
        stale_docs = documents.stale_uploaded_documents(s, settings.reconcile_grace_s, now)
        stale_jobs = jobs.stale_queued_jobs(s, settings.reconcile_grace_s, now)
        jobs.fail_jobs_of_failed_documents(s)
        # One message per document: its gpu body claims all of the document's queued jobs.
        job_messages = jobs.one_job_per_document(s, [*requeued_jobs, *stale_jobs])
    for doc_id in [*requeued_docs, *stale_docs]:  # a PDF password is read from the row by the parse
        dispatcher.enqueue_parse(doc_id)
    for job_id in job_messages:
        dispatcher.enqueue_job(job_id)
    counts = {
        "requeued_jobs": len(requeued_jobs), "failed_jobs": len(failed_jobs),
        "requeued_documents": len(requeued_docs), "failed_documents": len(failed_docs),
        "resent_documents": len(stale_docs), "resent_jobs": len(stale_jobs),
    }
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts


def run_periodically(settings: Settings, stop: threading.Event, *, dispatcher: Dispatcher) -> None:
    """Embedded mode: tick every reaper_interval_s until stop is set; a failed tick is logged, not fatal."""
    while True:
        try:
            tick(settings, dispatcher=dispatcher)
        except Exception:
            log.exception("reaper tick failed; retrying next interval")
        if stop.wait(settings.reaper_interval_s):
            return
