"""storage.documents / storage.jobs (the fenced lease, storage/lease.py) on real Postgres: claims are exclusive, writes are fenced by the attempt, the reaper
re-queues then fails `worker_lost`, a result is written once. These are the guarantees the worker
kill tests rely on, checked row by row."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from pipeline.types import Chunk as PipelineChunk
from pipeline.types import DocumentText, PageSpan, PageText, ParsedDocument
from storage import documents, jobs, migrate
from storage.db import get_engine, session_scope
from storage.document_text import load_document_text
from storage.models import Document, DocumentStatus, Job, JobStatus, Result, utcnow


@pytest.fixture
def db(pg_url: str):
    migrate.upgrade(pg_url)
    yield pg_url
    get_engine(pg_url).dispose()


def _document(url: str, status: DocumentStatus = DocumentStatus.uploaded) -> uuid.UUID:
    with session_scope(url) as s:
        doc = Document(filename="x.pdf", sha256="0" * 64, bytes=1, status=status)
        s.add(doc)
        s.flush()
        return doc.id


def _job(url: str, document_id: uuid.UUID) -> uuid.UUID:
    with session_scope(url) as s:
        job = Job(document_id=document_id, task="summarize", params={})
        s.add(job)
        s.flush()
        return job.id


def _parsed_pair() -> tuple[ParsedDocument, DocumentText]:
    pages = [PageText(1, "Alpha page."), PageText(2, "Beta page.", label="ii")]
    full = "Alpha page.\n\nBeta page."
    spans = [PageSpan(1, 0, 11), PageSpan(2, 13, 23)]
    chunks = [PipelineChunk(0, full[0:13], 4, 1, 1, 0, 13), PipelineChunk(1, full[11:23], 4, 1, 2, 11, 23)]
    return ParsedDocument("application/pdf", pages, ["w"]), DocumentText(full, spans, chunks, 8)


def test_document_claim_is_exclusive_and_reparse_replaces_rows(db: str) -> None:
    doc_id = _document(db)
    with session_scope(db) as s:
        first = documents.claim_document(s, doc_id, 60)
    with session_scope(db) as s:
        assert documents.claim_document(s, doc_id, 60) is None  # a duplicate message wins nothing
    parsed, text = _parsed_pair()
    with session_scope(db) as s:
        assert documents.store_parsed_document(s, doc_id, first, parsed, text)
    with session_scope(db) as s:  # explicit re-parse of the same bytes: same rows, not twice as many
        second = documents.claim_document(s, doc_id, 60, reparse=True)
        assert second == first + 1
        assert not documents.store_parsed_document(s, doc_id, first, parsed, text)  # stale attempt is fenced off
        assert documents.store_parsed_document(s, doc_id, second, parsed, text)
    with session_scope(db) as s:
        doc = s.get(Document, doc_id)
        assert (doc.status, doc.pages, doc.tokens, len(doc.page_rows), len(doc.chunks)) == ("parsed", 2, 8, 2, 2)
        rebuilt = load_document_text(s, doc_id)
    assert rebuilt.full_text == text.full_text
    assert rebuilt.page_spans == text.page_spans and rebuilt.chunks == text.chunks


def test_job_claim_waits_for_parse_and_result_is_written_once(db: str) -> None:
    doc_id = _document(db)
    job_id = _job(db, doc_id)
    with session_scope(db) as s:
        assert jobs.claim_job(s, job_id, "w1", 60) is None  # document not parsed yet: stays queued
    with session_scope(db) as s:
        s.get(Document, doc_id).status = DocumentStatus.parsed
    with session_scope(db) as s:
        attempt = jobs.claim_job(s, job_id, "w1", 60)
    assert attempt == 1
    with session_scope(db) as s:
        assert jobs.claim_job(s, job_id, "w2", 60) is None
        assert jobs.heartbeat_job(s, job_id, attempt, 60, 0.5, "reading")
        assert not jobs.heartbeat_job(s, job_id, attempt + 1, 60)
        assert not jobs.complete_job(s, job_id, attempt + 1, {"x": 1})
    with session_scope(db) as s:
        assert jobs.complete_job(s, job_id, attempt, {"summary": "ok"})
    with session_scope(db) as s:
        assert not jobs.complete_job(s, job_id, attempt, {"summary": "again"})  # already terminal
        job = s.get(Job, job_id)
        assert (job.status, job.progress, job.result.payload) == ("succeeded", 1.0, {"summary": "ok"})
        assert s.scalar(select(func.count()).select_from(Result)) == 1


def test_canceled_job_cannot_be_completed(db: str) -> None:
    doc_id = _document(db, DocumentStatus.parsed)
    job_id = _job(db, doc_id)
    with session_scope(db) as s:
        attempt = jobs.claim_job(s, job_id, "w1", 60)
    with session_scope(db) as s:  # what the API's DELETE /v1/jobs/{id} does
        s.get(Job, job_id).status = JobStatus.canceled
    with session_scope(db) as s:
        assert not jobs.heartbeat_job(s, job_id, attempt, 60)
        assert not jobs.complete_job(s, job_id, attempt, {"late": True})
    with session_scope(db) as s:
        assert s.get(Job, job_id).status == "canceled"
        assert s.scalar(select(func.count()).select_from(Result)) == 0


def test_reaper_requeues_expired_leases_then_fails_worker_lost(db: str) -> None:
    doc_id = _document(db, DocumentStatus.parsed)
    job_id = _job(db, doc_id)
    for attempt in (1, 2):
        with session_scope(db) as s:
            assert jobs.claim_job(s, job_id, f"w{attempt}", 60) == attempt
        with session_scope(db) as s:  # not expired yet: untouched
            assert jobs.reap_expired_jobs(s, max_attempts=2) == ([], [])
        with session_scope(db) as s:
            requeued, failed = jobs.reap_expired_jobs(s, max_attempts=2, now=utcnow() + timedelta(seconds=120))
        assert (requeued, failed) == (([job_id], []) if attempt == 1 else ([], [job_id]))
    with session_scope(db) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.error_code, job.attempts) == ("failed", "worker_lost", 2)


def test_reaper_fails_a_document_and_its_jobs_after_max_attempts(db: str) -> None:
    doc_id = _document(db)
    job_id = _job(db, doc_id)
    later = utcnow() + timedelta(seconds=120)
    with session_scope(db) as s:
        documents.claim_document(s, doc_id, 60)
    with session_scope(db) as s:
        assert documents.reap_expired_documents(s, max_attempts=2, now=later) == ([doc_id], [])
        assert s.get(Document, doc_id).status == "uploaded"
    with session_scope(db) as s:
        documents.claim_document(s, doc_id, 60)
    with session_scope(db) as s:
        assert documents.reap_expired_documents(s, max_attempts=2, now=later) == ([], [doc_id])
    with session_scope(db) as s:
        doc, job = s.get(Document, doc_id), s.get(Job, job_id)
        assert (doc.status, doc.error_code) == ("failed", "worker_lost")
        assert (job.status, job.error_code) == ("failed", "worker_lost")


def test_reconciler_resends_stale_work_once_per_grace_period(db: str) -> None:
    uploaded = _document(db)
    parsed = _document(db, DocumentStatus.parsed)
    job_id = _job(db, parsed)
    waiting_job = _job(db, uploaded)  # its document is not parsed: the parse releases it, not the reconciler
    later = utcnow() + timedelta(seconds=120)
    with session_scope(db) as s:
        # fresh rows are the broker's business
        assert (documents.stale_uploaded_documents(s, 60), jobs.stale_queued_jobs(s, 60)) == ([], [])
    with session_scope(db) as s:
        stale_docs = documents.stale_uploaded_documents(s, 60, now=later)
        stale_jobs = jobs.stale_queued_jobs(s, 60, now=later)
    assert stale_docs == [uploaded] and stale_jobs == [job_id] and waiting_job not in stale_jobs
    with session_scope(db) as s:  # bumped: not re-sent yet
        again = later + timedelta(seconds=1)
        assert (documents.stale_uploaded_documents(s, 60, again), jobs.stale_queued_jobs(s, 60, again)) == ([], [])
