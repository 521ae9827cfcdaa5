"""Claim / lease / heartbeat / complete / fail / requeue queries for documents and jobs.

Every state change is one conditional UPDATE, so two workers (or a worker and the reaper) can never
both win: a claim moves `uploaded -> parsing` / `queued -> running` and bumps the attempt counter, and
that counter is the fencing token every later write must present. A worker whose lease was taken
over (reaper re-queued it, the API canceled it) finds its writes match no row and stops.
Times are UTC from this process's clock, as the models' defaults are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, insert, select, update
from sqlalchemy.orm import Session

from pipeline.types import Chunk as PipelineChunk
from pipeline.types import DocumentText, PageSpan, ParsedDocument
from storage.models import Chunk, Document, DocumentStatus, Job, JobStatus, Page, Result, utcnow

WORKER_LOST = "worker_lost"


def _lease(lease_s: float) -> datetime:
    return utcnow() + timedelta(seconds=lease_s)


# --- documents -----------------------------------------------------------------------------------

def claim_document(session: Session, document_id: uuid.UUID, lease_s: float, *, reparse: bool = False) -> int | None:
    """uploaded -> parsing with a lease; returns the attempt number (fencing token), None if not claimable.

    reparse=True also claims a parsed or failed document (an explicit re-parse of the same bytes).
    """
    allowed = [DocumentStatus.uploaded]
    if reparse:
        allowed += [DocumentStatus.parsed, DocumentStatus.failed]
    row = session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status.in_(allowed))
        .values(status=DocumentStatus.parsing, parse_attempts=Document.parse_attempts + 1,
                lease_until=_lease(lease_s), updated_at=utcnow())
        .returning(Document.parse_attempts)
    ).first()
    return None if row is None else int(row[0])


def _document_fence(document_id: uuid.UUID, attempt: int):  # noqa: ANN202
    return (Document.id == document_id, Document.status == DocumentStatus.parsing,
            Document.parse_attempts == attempt)


def extend_document_lease(session: Session, document_id: uuid.UUID, attempt: int, lease_s: float) -> bool:
    """Heartbeat; False when the claim is no longer ours (reaped, deleted)."""
    result = session.execute(update(Document).where(*_document_fence(document_id, attempt))
                             .values(lease_until=_lease(lease_s)))
    return result.rowcount == 1


def store_parsed_document(session: Session, document_id: uuid.UUID, attempt: int, parsed: ParsedDocument,
                          text: DocumentText) -> bool:
    """parsing -> parsed, replacing pages and chunks, in the caller's one transaction.

    False (and nothing written) when the claim is no longer ours.
    """
    result = session.execute(
        update(Document).where(*_document_fence(document_id, attempt))
        .values(status=DocumentStatus.parsed, media_type=parsed.media_type, pages=len(parsed.pages),
                needs_ocr_pages=parsed.needs_ocr_pages, tokens=text.token_count, warnings=list(parsed.warnings),
                error_code=None, error_message=None, lease_until=None, updated_at=utcnow()))
    if result.rowcount != 1:
        return False
    session.execute(delete(Page).where(Page.document_id == document_id))
    session.execute(delete(Chunk).where(Chunk.document_id == document_id))
    spans = {s.number: s for s in text.page_spans}
    page_rows = []
    for page in parsed.pages:
        span = spans.get(page.number)
        page_rows.append({
            "document_id": document_id, "number": page.number, "label": page.label, "text": page.text,
            "needs_ocr": page.needs_ocr,
            "char_start": span.char_start if span else 0, "char_end": span.char_end if span else 0,
        })
    if page_rows:
        session.execute(insert(Page), page_rows)
    chunk_rows = [{
        "document_id": document_id, "index": c.index, "text": c.text, "token_count": c.token_count,
        "page_start": c.page_start, "page_end": c.page_end, "char_start": c.char_start, "char_end": c.char_end,
    } for c in text.chunks]
    if chunk_rows:
        session.execute(insert(Chunk), chunk_rows)
    return True


def fail_document(session: Session, document_id: uuid.UUID, attempt: int | None, code: str, message: str) -> bool:
    """-> failed with {code, message}. attempt=None fails it from any non-terminal state (reaper)."""
    if attempt is None:
        where = (Document.id == document_id,
                 Document.status.in_([DocumentStatus.uploaded, DocumentStatus.parsing]))
    else:
        where = _document_fence(document_id, attempt)
    result = session.execute(update(Document).where(*where).values(
        status=DocumentStatus.failed, error_code=code, error_message=message[:2000], lease_until=None,
        updated_at=utcnow()))
    return result.rowcount == 1


def release_document(session: Session, document_id: uuid.UUID, attempt: int) -> bool:
    """parsing -> uploaded (give the claim back, e.g. before a transient-error retry)."""
    result = session.execute(update(Document).where(*_document_fence(document_id, attempt)).values(
        status=DocumentStatus.uploaded, lease_until=None, updated_at=utcnow()))
    return result.rowcount == 1


def queued_job_ids(session: Session, document_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(Job.id).where(Job.document_id == document_id,
                                                     Job.status == JobStatus.queued).order_by(Job.created_at)))


def fail_queued_jobs(session: Session, document_id: uuid.UUID, code: str, message: str) -> int:
    """A document that failed to parse fails its waiting jobs with the document's error."""
    now = utcnow()
    result = session.execute(update(Job).where(Job.document_id == document_id, Job.status == JobStatus.queued)
                             .values(status=JobStatus.failed, error_code=code, error_message=message[:2000],
                                     finished_at=now, updated_at=now))
    return result.rowcount


# --- jobs ----------------------------------------------------------------------------------------

def claim_job(session: Session, job_id: uuid.UUID, worker_id: str, lease_s: float) -> int | None:
    """queued -> running (attempts+1, lease, worker_id) when its document is parsed; returns the attempt."""
    now = utcnow()
    document_parsed = exists().where(Document.id == Job.document_id, Document.status == DocumentStatus.parsed)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, document_parsed)
        .values(status=JobStatus.running, attempts=Job.attempts + 1, lease_until=_lease(lease_s),
                worker_id=worker_id[:255], started_at=now, progress=0.0, stage="starting", updated_at=now)
        .returning(Job.attempts)
    ).first()
    return None if row is None else int(row[0])


def _job_fence(job_id: uuid.UUID, attempt: int):  # noqa: ANN202
    return Job.id == job_id, Job.status == JobStatus.running, Job.attempts == attempt


def heartbeat_job(session: Session, job_id: uuid.UUID, attempt: int, lease_s: float,
                  progress: float | None = None, stage: str | None = None) -> bool:
    """Extend the lease (and record progress); False when canceled, reaped or deleted."""
    values: dict[str, Any] = {"lease_until": _lease(lease_s)}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    if stage is not None:
        values["stage"] = stage[:64]
    result = session.execute(update(Job).where(*_job_fence(job_id, attempt)).values(**values))
    return result.rowcount == 1


def has_result(session: Session, job_id: uuid.UUID) -> bool:
    return session.scalar(select(exists().where(Result.job_id == job_id))) is True


def complete_job(session: Session, job_id: uuid.UUID, attempt: int, payload: dict[str, Any] | None) -> bool:
    """running -> succeeded and the Result row, in the caller's one transaction.

    payload=None marks it succeeded without writing (the result already exists from an earlier attempt).
    False when the claim is no longer ours: nothing is written.
    """
    now = utcnow()
    result = session.execute(update(Job).where(*_job_fence(job_id, attempt)).values(
        status=JobStatus.succeeded, progress=1.0, stage="done", lease_until=None, finished_at=now,
        error_code=None, error_message=None, updated_at=now))
    if result.rowcount != 1:
        return False
    if payload is not None:
        session.execute(insert(Result).values(job_id=job_id, payload=payload, created_at=now))
    return True


def fail_job(session: Session, job_id: uuid.UUID, attempt: int | None, code: str, message: str) -> bool:
    """-> failed with {code, message}. attempt=None fails a queued job (no claim held)."""
    where = (Job.id == job_id, Job.status == JobStatus.queued) if attempt is None else _job_fence(job_id, attempt)
    now = utcnow()
    result = session.execute(update(Job).where(*where).values(
        status=JobStatus.failed, error_code=code, error_message=message[:2000], lease_until=None,
        finished_at=now, updated_at=now))
    return result.rowcount == 1


def requeue_job(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """running -> queued (give the claim back before a transient-error retry)."""
    result = session.execute(update(Job).where(*_job_fence(job_id, attempt)).values(
        status=JobStatus.queued, lease_until=None, worker_id=None, stage="retrying", updated_at=utcnow()))
    return result.rowcount == 1


# --- reaper / reconciler -----------------------------------------------------------------------------

@dataclass
class ReapReport:
    requeued_jobs: list[uuid.UUID]
    failed_jobs: list[uuid.UUID]
    requeued_documents: list[uuid.UUID]
    failed_documents: list[uuid.UUID]


def reap_expired(session: Session, max_attempts: int, now: datetime | None = None) -> ReapReport:
    """Running jobs / parsing documents whose lease expired: re-queue, or fail `worker_lost` after
    max_attempts. Each row changes with a conditional UPDATE, so concurrent reapers do not double-act."""
    now = now or utcnow()
    report = ReapReport([], [], [], [])
    expired_jobs = session.execute(select(Job.id, Job.attempts).where(
        Job.status == JobStatus.running, Job.lease_until < now)).all()
    for job_id, attempts in expired_jobs:
        fence = (*_job_fence(job_id, attempts), Job.lease_until < now)
        if attempts >= max_attempts:
            msg = f"the worker running this job vanished {attempts} time(s) (lease expired); giving up"
            done = session.execute(update(Job).where(*fence).values(
                status=JobStatus.failed, error_code=WORKER_LOST, error_message=msg, lease_until=None,
                finished_at=now, updated_at=now)).rowcount
            if done:
                report.failed_jobs.append(job_id)
        elif session.execute(update(Job).where(*fence).values(
                status=JobStatus.queued, lease_until=None, worker_id=None, stage="requeued",
                updated_at=now)).rowcount:
            report.requeued_jobs.append(job_id)

    expired_docs = session.execute(select(Document.id, Document.parse_attempts).where(
        Document.status == DocumentStatus.parsing, Document.lease_until < now)).all()
    for doc_id, attempts in expired_docs:
        fence = (*_document_fence(doc_id, attempts), Document.lease_until < now)
        if attempts >= max_attempts:
            msg = f"the worker parsing this document vanished {attempts} time(s) (lease expired); giving up"
            if session.execute(update(Document).where(*fence).values(
                    status=DocumentStatus.failed, error_code=WORKER_LOST, error_message=msg, lease_until=None,
                    updated_at=now)).rowcount:
                fail_queued_jobs(session, doc_id, WORKER_LOST, f"document failed to parse: {msg}")
                report.failed_documents.append(doc_id)
        elif session.execute(update(Document).where(*fence).values(
                status=DocumentStatus.uploaded, lease_until=None, updated_at=now)).rowcount:
            report.requeued_documents.append(doc_id)
    return report


def stale_work(session: Session, grace_s: float, now: datetime | None = None) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Work the broker may have lost: queued jobs of parsed documents and uploaded documents untouched
    for grace_s. Their updated_at is bumped, so each is re-sent at most once per grace period.
    Queued jobs of failed documents are failed here too. Returns (document_ids, job_ids) to enqueue."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    doc_ids = list(session.scalars(select(Document.id).where(
        Document.status == DocumentStatus.uploaded, Document.updated_at < cutoff)))
    if doc_ids:
        session.execute(update(Document).where(Document.id.in_(doc_ids), Document.status == DocumentStatus.uploaded)
                        .values(updated_at=now))
    job_ids = list(session.scalars(select(Job.id).join(Document, Document.id == Job.document_id).where(
        Job.status == JobStatus.queued, Job.updated_at < cutoff, Document.status == DocumentStatus.parsed)))
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.queued).values(updated_at=now))
    failed_docs = session.execute(select(Document.id, Document.error_code, Document.error_message).where(
        Document.status == DocumentStatus.failed,
        exists().where(Job.document_id == Document.id, Job.status == JobStatus.queued))).all()
    for doc_id, code, message in failed_docs:
        fail_queued_jobs(session, doc_id, code or "parse_error", f"document failed to parse: {message or code}")
    return doc_ids, job_ids


# --- reading a parsed document back --------------------------------------------------------------------

def load_document_text(session: Session, document_id: uuid.UUID) -> DocumentText:
    """The DocumentText the parse stored: page offset table, chunks, and the full text rebuilt exactly.

    Pages hold the text at [char_start, char_end); what lies between pages (separators) is recovered
    from the chunks, which are exact slices of the full text; any gap no chunk covers is a space.
    """
    doc = session.get(Document, document_id)
    if doc is None:
        raise LookupError(f"document {document_id} not found")
    pages = session.execute(select(Page.number, Page.text, Page.char_start, Page.char_end)
                            .where(Page.document_id == document_id).order_by(Page.number)).all()
    chunk_rows = session.scalars(select(Chunk).where(Chunk.document_id == document_id).order_by(Chunk.index)).all()
    length = max([p.char_end for p in pages] + [c.char_end for c in chunk_rows] + [0])
    buf = [" "] * length
    for c in chunk_rows:
        buf[c.char_start:c.char_end] = c.text
    for p in pages:
        if p.char_end > p.char_start:
            buf[p.char_start:p.char_end] = p.text[: p.char_end - p.char_start]
    spans = [PageSpan(p.number, p.char_start, p.char_end) for p in pages]
    chunks = [PipelineChunk(index=c.index, text=c.text, token_count=c.token_count, page_start=c.page_start,
                            page_end=c.page_end, char_start=c.char_start, char_end=c.char_end) for c in chunk_rows]
    return DocumentText(full_text="".join(buf), page_spans=spans, chunks=chunks, token_count=doc.tokens or 0)
