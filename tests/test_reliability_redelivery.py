"""A SIGKILLed worker's message comes back late, and then does nothing (issue 12).

With acks_late the message of a job a worker was running stays in Redis's `unacked` hash when the
worker dies; Redis hands it out again only after the visibility timeout (4 h by default), long after
the database-side lease recovered the job (lease + a reaper tick). Here the private Redis gets the
smallest visibility timeout the settings allow, so the real redelivery happens within the test: a
worker started after the timeout restores the message at start-up, receives it and must change
nothing: no second result, no status change, no extra attempt. A parse message sent again after the
parse finished is a no-op too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select

from storage.db import session_scope
from storage.models import Chunk, Document, Job, Page, Result
from tests.fixtures_workers import (
    ServiceSetup,
    WorkerProcess,
    api_client,
    create_long_qa_job,
    poll_document,
    poll_job,
    running_service,
    upload,
    wait_for,
)
from tests.private_redis import PrivateRedis, private_redis

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# celery_app clamps the visibility timeout to at least 2 x parse_timeout_s and 2 x job_lease_s: 10 s here.
VISIBILITY_S = 10
FAST = {"job_lease_s": 5, "reaper_interval_s": 1.0, "parse_timeout_s": 5.0, "visibility_timeout_s": 1,
        # no reconciler re-sends: the only messages are the upload's, the reaper's and the redelivery
        "reconcile_grace_s": 3600.0}


@pytest.fixture
def redelivery_service(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServiceSetup, PrivateRedis]]:
    with private_redis() as broker, running_service(pg_url, broker.url, tmp_path, gpu_documents_in_flight=1,
                                                    **FAST) as setup:
        yield setup, broker


def _snapshot(url: str, job_id: str, doc_id: str) -> dict[str, object]:
    """Everything a redelivered message could change."""
    with session_scope(url) as s:
        job, doc = s.get(Job, job_id), s.get(Document, doc_id)
        return {
            "job": (job.status, job.attempts, job.worker_id, job.error_code, job.updated_at, job.finished_at),
            "results": s.execute(select(Result.job_id, Result.created_at).where(Result.job_id == job_id)).all(),
            "document": (doc.status, doc.parse_attempts, doc.updated_at, doc.pages, doc.tokens),
            "pages": s.scalar(select(func.count()).select_from(Page).where(Page.document_id == doc_id)),
            "chunks": s.scalar(select(func.count()).select_from(Chunk).where(Chunk.document_id == doc_id)),
            "jobs": s.scalar(select(func.count()).select_from(Job)),
        }


def test_a_killed_workers_late_redelivery_changes_nothing(
        redelivery_service: tuple[ServiceSetup, PrivateRedis], corpus_dir: Path) -> None:
    service, broker = redelivery_service
    url = service.settings.effective_database_url
    service.start_worker("parse", "--beat", ready=False)
    doomed = service.start_worker("gpu", ready=False)
    for worker in service.workers:
        worker.wait_ready()
    unacked = redis.Redis.from_url(broker.url)
    try:
        with api_client(service.settings) as client:
            h = service.headers
            # plain text parses well within the 5 s parse limit; 20 questions on 106 pages keep the job
            # running for a few seconds
            doc = upload(client, h, corpus_dir / "contract-verizon-abs-service.txt")
            assert poll_document(client, h, doc["id"], timeout=60)["status"] == "parsed"
            job_id = create_long_qa_job(client, h, doc["id"])

            # Killed as soon as it holds the job: what matters is a claimed job whose message is unacked.
            wait_for(lambda: _job(url, job_id).status == "running", 90, 0.02, what="the gpu worker to claim the job")
            doomed.kill()
            killed_at = time.monotonic()
            lost = _job(url, job_id)
            assert (lost.status, lost.attempts) == ("running", 1), "the kill came after the job had finished"
            # the dead worker's delivery is still in Redis, unacknowledged
            assert unacked.hlen("unacked") == 1, unacked.hgetall("unacked")
            delivered_at = unacked.zrange("unacked_index", 0, -1, withscores=True)[0][1]

            # The lease recovers the job: the reaper re-queues it once the lease expires and re-sends it.
            survivor = service.start_worker("gpu")
            job = poll_job(client, h, job_id, timeout=120)
            recovered_s = time.monotonic() - killed_at
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            # the survivor acks its own delivery when the task returns, just after the commit the poll
            # saw (acks_late): wait for that, then only the killed worker's message is left
            wait_for(lambda: unacked.hlen("unacked") <= 1, 15, 0.05, what="the survivor to ack its delivery")
            assert unacked.hlen("unacked") == 1, "the killed worker's message must still be waiting"
            before = _snapshot(url, job_id, doc["id"])
            survivor.stop()

            # The killed worker comes back after the visibility timeout: at start-up it restores the
            # message, and receives it again.
            wait_for(lambda: time.time() > delivered_at + VISIBILITY_S + 0.5, VISIBILITY_S + 5, 0.2,
                     what="the visibility timeout to pass")
            restarted = service.start_worker("gpu")
            wait_for(lambda: _task_lines(restarted, "longdoc.run_job", job_id, "received"), 60, 0.2,
                     what="the late redelivery to arrive")
            wait_for(lambda: _task_lines(restarted, "longdoc.run_job", job_id, "succeeded"), 30, 0.2,
                     what="the redelivered task to return")
            wait_for(lambda: unacked.hlen("unacked") == 0, 10, 0.2, what="the redelivered message to be acked")
            assert _snapshot(url, job_id, doc["id"]) == before, "the late redelivery changed the job"

            # A parse message arriving after the parse finished (a duplicate, or a late redelivery) is a no-op too.
            # Sent by task name and queue, the broker contract, as any sender would.
            parser = service.workers[0]
            parses = len(_task_lines(parser, "longdoc.parse_document", doc["id"], "succeeded"))
            sender = Celery(broker=broker.url, set_as_current=False)
            sender.send_task("longdoc.parse_document", args=[doc["id"]], queue="parse",
                             task_id=f"late-parse-{doc['id']}")
            wait_for(lambda: len(_task_lines(parser, "longdoc.parse_document", doc["id"], "succeeded")) > parses,
                     30, 0.2, what="the repeated parse message to be run")
            sender.close()
            wait_for(lambda: unacked.hlen("unacked") == 0, 10, 0.2, what="the parse message to be acked")
            assert _snapshot(url, job_id, doc["id"]) == before, "a repeated parse message changed the document"
    finally:
        unacked.close()
    log.info("recovered by the lease %.1f s after the kill; the redelivery came after the %d s visibility timeout",
             recovered_s, VISIBILITY_S)


def _task_lines(worker: WorkerProcess, task: str, row_id: str, event: str) -> list[str]:
    """Celery's log lines "Task <name>[<task id>] received|succeeded ..." for messages about row_id."""
    return [line for line in worker.log().splitlines()
            if f"Task {task}[" in line and row_id in line and f"] {event}" in line]


def _job(url: str, job_id: str) -> Job:
    with session_scope(url) as s:
        return s.get(Job, job_id)
