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
from tests.fixtures_workers import ServiceSetup, api_client, poll_document, upload
from workers import reaper
from workers.transport import get_dispatcher

GRACE_S = 3.0
TICK_S = 0.25
SOURCES = ("contract-galera-joint-filing.pdf", "report-ntsb-accident-nyc08ca055.pdf",
           "contract-ivillage-sponsorship.pdf")


def test_the_reconciler_resends_a_documents_jobs_once_per_grace_period(service: ServiceSetup,
                                                                       corpus_dir: Path) -> None:
    service.settings = settings = service.settings.model_copy(update={"reconcile_grace_s": GRACE_S})
    h = service.headers
    with api_client(settings) as client:
        docs = [upload(client, h, corpus_dir / name, tasks="summarize,qa,classify", question="Who signed it?")
                for name in SOURCES]
        # A parse backlog longer than the grace: the jobs were created well before their document parsed.
        time.sleep(GRACE_S + 0.5)
        parse_worker = service.start_worker("parse")
        for doc in docs:
            assert poll_document(client, h, doc["id"], timeout=120)["status"] == "parsed"
    parse_worker.stop()

    url = settings.effective_database_url
    with session_scope(url) as s:
        job_document = dict(s.execute(select(Job.id, Job.document_id)).all())
        parsed_at = dict(s.execute(select(Document.id, Document.updated_at)).all())
    assert len(job_document) == 9
    gpu = f"{settings.broker_key_prefix}gpu"
    client = redis.Redis.from_url(settings.broker_url)

    def documents_sent(messages: list[bytes]) -> list[uuid.UUID]:
        ids = [json.loads(m)["headers"]["id"] for m in messages]  # task id "job-<job id>"
        return [job_document[uuid.UUID(i.removeprefix("job-"))] for i in ids]

    released = documents_sent(client.lrange(gpu, 0, -1))
    assert sorted(released) == sorted(parsed_at)  # the parse sent one message per document
    sends: dict[uuid.UUID, list[datetime]] = {d: [parsed_at[d]] for d in parsed_at}
    seen = len(released)
    deadline = time.monotonic() + 2.5 * GRACE_S
    while time.monotonic() < deadline:
        reaper.tick(settings, dispatcher=get_dispatcher(settings))
        length = client.llen(gpu)
        new = client.lrange(gpu, 0, length - seen - 1) if length > seen else []  # kombu pushes at the head
        seen = length
        now = utcnow()
        for doc_id in documents_sent(new):
            sends[doc_id].append(now)
        time.sleep(TICK_S)
    client.close()

    for doc_id, times in sends.items():
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:], strict=False)]
        # No second message within the grace of the last one (a tick's own duration is the slack) ...
        assert all(gap > GRACE_S - 0.5 for gap in gaps), (doc_id, gaps)
        # ... and the work is still re-sent once per grace while it stays queued (its message may be lost).
        assert len(gaps) >= 2, (doc_id, gaps)
    assert seen <= len(SOURCES) * 4, seen  # 3 documents, 9 jobs: 3 releases + at most 3 re-sends each


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
