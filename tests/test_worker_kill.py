"""A worker SIGKILLed mid-task (the whole process group: worker, pool, parse child, as a lost machine)
leaves a claimed row whose lease expires; a new worker's reaper re-queues it and the work completes
once, with one set of pages and one result. Leases are 5 s and the reaper ticks every second here
(FAST_RECOVERY); production defaults are minutes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.db import session_scope
from storage.models import Chunk, Document, Job, Page, Result
from tests.fixtures_workers import (
    LONG_QA_FILE,
    ServiceSetup,
    api_client,
    create_long_qa_job,
    poll_document,
    poll_job,
    upload,
    wait_for,
)

pytestmark = pytest.mark.slow


def _row(service: ServiceSetup, model: type, row_id: str):  # noqa: ANN202
    with session_scope(service.settings.effective_database_url) as s:
        return s.get(model, row_id)


def test_worker_killed_while_parsing_the_400_page_document(service: ServiceSetup, corpus_dir: Path) -> None:
    # pypdf is ~10x slower than PDFium: it keeps the first worker busy long enough to be killed mid-parse.
    doomed = service.start_worker("parse", "--concurrency", "1", pdf_extractor="pypdf")
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / "hostile-irs-irm-400pages.pdf")
        wait_for(lambda: _row(service, Document, doc["id"]).status == "parsing", 60, 0.05,
                 what="the first worker to claim the document")
        doomed.kill()
        lost = _row(service, Document, doc["id"])
        assert (lost.status, lost.parse_attempts) == ("parsing", 1)  # killed mid-parse, nothing stored

        service.start_worker("parse", "--beat")
        body = poll_document(client, h, doc["id"], timeout=150)
        assert body["status"] == "parsed", body
        assert body["pages"] == 400

    with session_scope(service.settings.effective_database_url) as s:
        parsed = s.get(Document, doc["id"])
        assert parsed.parse_attempts == 2
        assert s.scalar(select(func.count()).select_from(Page).where(Page.document_id == parsed.id)) == 400
        chunk_indexes = s.scalars(select(Chunk.index).where(Chunk.document_id == parsed.id)).all()
        assert sorted(chunk_indexes) == list(range(len(chunk_indexes)))  # one set of chunks, no duplicates


def test_worker_killed_while_running_a_job(service: ServiceSetup, corpus_dir: Path) -> None:
    parser = service.start_worker("parse", ready=False)
    doomed = service.start_worker("gpu", ready=False)
    parser.wait_ready()
    doomed.wait_ready()
    with api_client(service.settings) as client:
        h = service.headers
        # The extractive backend answers even 20 questions on a 106-page contract in a second or two on
        # a quiet machine, and job progress is written about once a second: waiting for a "computing"
        # stage raced the job's end. Killed as soon as it holds the job, the worker has claimed it and
        # written nothing, which is the state this test is about.
        doc = upload(client, h, corpus_dir / LONG_QA_FILE)
        assert poll_document(client, h, doc["id"], timeout=120)["status"] == "parsed"
        job_id = create_long_qa_job(client, h, doc["id"])

        def claimed() -> bool:
            job = _row(service, Job, job_id)
            assert job.status in ("running", "queued"), (job.status, job.error_code, job.error_message,
                                                         doomed.log()[-3000:])
            return job.status == "running"

        wait_for(claimed, 120, 0.02, what="the gpu worker to claim the job")
        doomed.kill()
        lost = _row(service, Job, job_id)
        assert (lost.status, lost.attempts) == ("running", 1), "the kill came after the job had finished"
        with session_scope(service.settings.effective_database_url) as s:
            assert s.get(Job, job_id).result is None  # killed before writing anything

        parser.stop()
        service.start_worker("gpu", "--beat")
        job = poll_job(client, h, job_id, timeout=240)
        logs = "\n".join(w.log()[-2500:] for w in service.workers[1:])
        assert job["status"] == "succeeded", (job, logs)
        assert job["attempts"] == 2 and job["result"], (job, logs)

    with session_scope(service.settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 1


def test_a_job_whose_worker_keeps_dying_fails_worker_lost(service: ServiceSetup, corpus_dir: Path) -> None:
    """After settings.max_attempts lost leases the reaper gives up with a clear error instead of looping."""
    doomed = service.start_worker("parse,gpu", max_attempts=1)
    with api_client(service.settings) as client:
        h = service.headers
        # A long job (20 questions on 106 pages): a short summary ends before a poll sees it running.
        doc = upload(client, h, corpus_dir / LONG_QA_FILE)
        assert poll_document(client, h, doc["id"], timeout=120)["status"] == "parsed"
        job_id = create_long_qa_job(client, h, doc["id"])
        wait_for(lambda: _row(service, Job, job_id).status != "queued", 90, 0.02, what="the job to be claimed")
        doomed.kill()
        assert _row(service, Job, job_id).status == "running", "the kill came after the job had finished"
        service.start_worker("parse", "--beat", max_attempts=1)
        job = poll_job(client, h, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    assert job["attempts"] == 1 and "vanished" in job["error"]["message"]


def test_messages_lost_by_the_broker_are_resent_by_the_reconciler(service: ServiceSetup, corpus_dir: Path) -> None:
    """Redis loses everything (flushed while no worker runs): the DB still knows the document is
    `uploaded`, and the reconciler re-sends it once it has been untouched for reconcile_grace_s."""
    import redis

    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / "contract-ivillage-sponsorship.pdf")
        broker = redis.Redis.from_url(service.settings.broker_url)
        lost = list(broker.scan_iter(match=f"{service.settings.broker_key_prefix}*"))
        assert lost, "the upload should have queued a message"
        broker.delete(*lost)
        broker.close()

        service.start_worker("parse", "--beat", reconcile_grace_s=2.0)
        body = poll_document(client, h, doc["id"], timeout=90)
    assert body["status"] == "parsed" and body["pages"] == 5, body


def test_a_database_outage_is_retried_with_backoff(service: ServiceSetup, corpus_dir: Path) -> None:
    """Postgres refuses connections when the parse message arrives: the task retries (a named transient
    error, OperationalError) with backoff instead of failing the document, and succeeds once it is back."""
    from sqlalchemy import create_engine, text

    from storage.blobs import BlobStore
    from storage.keys import authenticate
    from tests.conftest import PG_ADMIN_URL
    from workers.transport import get_dispatcher

    url = service.settings.effective_database_url
    path = corpus_dir / "contract-galera-joint-filing.pdf"
    with path.open("rb") as f:
        sha256, size, _ = BlobStore(service.settings.effective_blob_dir).put_stream(f, 10**8)
    with session_scope(url) as s:
        doc = Document(filename=path.name, sha256=sha256, bytes=size, owner_id=authenticate(s, service.api_key).id)
        s.add(doc)
        s.flush()
        doc_id = doc.id
    worker = service.start_worker("parse")

    db_name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": db_name})
        get_dispatcher(service.settings).enqueue_parse(doc_id)  # the broker is up; the database is not
        wait_for(lambda: "transient error, retry" in worker.log(), 60, 0.2, what="a transient-error retry")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    wait_for(lambda: _row(service, Document, doc_id).status == "parsed", 90, 0.3, what="the retried parse")
    assert _row(service, Document, doc_id).parse_attempts == 1  # the claim never happened during the outage
    assert worker.alive
