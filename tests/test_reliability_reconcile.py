"""The reconciler re-sends work the broker may have lost, but the same work at most once per
reconcile_grace_s (issue 12 saw 24 broker deliveries for 9 jobs with a short grace): it counts from
the row's last send, and one message per document runs all of that document's queued jobs.

Real Postgres, Redis and a `longdoc worker` for the parse queue; nothing consumes the gpu queue, so
every message the parse and the reconciler send stays there to be counted.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import redis
from sqlalchemy import select

from storage.db import session_scope
from storage.models import Document, DocumentStatus, Job, JobStatus, utcnow
from tests.fixtures_workers import ServiceSetup, api_client, upload, wait_for
from workers import reaper
from workers.transport import get_dispatcher

GRACE_S = 3.0
TICK_S = 0.25
SOURCES = ("contract-galera-joint-filing.pdf", "report-ntsb-accident-nyc08ca055.pdf",
           "contract-ivillage-sponsorship.pdf")


def test_the_reconciler_resends_a_documents_jobs_once_per_grace_period(service: ServiceSetup,
                                                                       corpus_dir: Path) -> None:
    service.settings = settings = service.settings.model_copy(update={"reconcile_grace_s": GRACE_S})
    dispatcher = get_dispatcher(settings)
    gpu = f"{settings.broker_key_prefix}gpu"
    broker = redis.Redis.from_url(settings.broker_url)
    url = settings.effective_database_url
    h = service.headers
    seen: set[str] = set()
    sent: list[tuple[str, datetime]] = []  # (job id, when first seen in the gpu queue)

    def tick_and_watch() -> None:
        """One reconciler tick, as the beat runs them; every message new in the gpu queue is noted."""
        reaper.tick(settings, dispatcher=dispatcher)
        now = utcnow()
        for raw in broker.lrange(gpu, 0, -1):
            message = json.loads(raw)
            if message["properties"]["delivery_tag"] not in seen:
                seen.add(message["properties"]["delivery_tag"])
                sent.append((message["headers"]["id"].removeprefix("job-"), now))

    with api_client(settings) as client:
        docs = [upload(client, h, corpus_dir / name, tasks="summarize,qa,classify", question="Who signed it?")
                for name in SOURCES]
        # A parse backlog longer than the grace: the jobs were created well before their document parsed.
        time.sleep(GRACE_S + 0.5)
        parse_worker = service.start_worker("parse")

        def all_parsed() -> bool:
            tick_and_watch()  # the reconciler runs meanwhile (and re-sends a parse message that was lost)
            return all(client.get(f"/v1/documents/{d['id']}", headers=h).json()["status"] == "parsed" for d in docs)

        wait_for(all_parsed, 120, TICK_S, what="the documents to parse")
        parse_worker.stop()
        deadline = time.monotonic() + 2.5 * GRACE_S
        while time.monotonic() < deadline:
            tick_and_watch()
            time.sleep(TICK_S)
    broker.close()

    with session_scope(url) as s:
        job_document = {str(j): d for j, d in s.execute(select(Job.id, Job.document_id)).all()}
        parsed_at = dict(s.execute(select(Document.id, Document.updated_at)).all())
    assert len(job_document) == 9
    for doc_id, parsed in parsed_at.items():
        # The parse's release comes right after the parsed row is written (its send time >= parsed),
        # then the reconciler's re-sends: each more than a grace after the send before it, so the k-th
        # is seen more than k graces after the parse. One per job, or one each tick, would be sooner.
        seconds = [(at - parsed).total_seconds() for job_id, at in sent if job_document[job_id] == doc_id]
        assert seconds and seconds[0] < GRACE_S, (doc_id, seconds)  # the release: one message
        resends = seconds[1:]
        assert all(after > k * GRACE_S for k, after in enumerate(resends, start=1)), (doc_id, seconds)
        # ... and the work is still re-sent once per grace while it stays queued (its message may be lost).
        assert len(resends) >= 2, (doc_id, seconds)


def test_jobs_reaped_from_one_document_are_resent_as_one_message(service: ServiceSetup) -> None:
    """A gpu worker killed while it ran a document's jobs: the reaper re-queues each, and sends one
    message for the document (its body claims them all), not one per job."""
    settings = service.settings
    expired = utcnow() - timedelta(seconds=60)
    with session_scope(settings.effective_database_url) as s:
        doc = Document(filename="a.pdf", sha256="0" * 64, bytes=1, status=DocumentStatus.parsed)
        s.add(doc)
        s.flush()
        held = [Job(document_id=doc.id, task="summarize", params={}, status=JobStatus.running, attempts=1,
                    lease_until=expired) for _ in range(3)]
        s.add_all(held)
        s.flush()
        job_ids = {j.id for j in held}
    counts = reaper.tick(settings, dispatcher=get_dispatcher(settings))
    assert counts["requeued_jobs"] == 3, counts
    client = redis.Redis.from_url(settings.broker_url)
    messages = client.lrange(f"{settings.broker_key_prefix}gpu", 0, -1)
    client.close()
    assert len(messages) == 1, messages
    assert uuid.UUID(json.loads(messages[0])["headers"]["id"].removeprefix("job-")) in job_ids
    with session_scope(settings.effective_database_url) as s:
        assert {s.get(Job, j).status for j in job_ids} == {JobStatus.queued}
