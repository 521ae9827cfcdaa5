"""Document queries: what the API asks (upload dedupe, read, list, delete) and the lease a parse holds.

API-side functions flush but never commit: the caller's unit of work commits, and enqueues only after
that; every API read is scoped by owner (storage/paging.py). Worker-side writes go through the fenced
lease (storage/lease.py): a claim moves `uploaded -> parsing` and bumps `parse_attempts`, the fencing
token every later write of that parse presents.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from pipeline.types import DocumentText, ParsedDocument
from storage import lease
from storage.blobs import BlobStore
from storage.document_text import replace_text
from storage.jobs import NON_TERMINAL, fail_queued_jobs
from storage.models import Document, DocumentStatus, Job, JobStatus, utcnow
from storage.paging import ResultPage, owned, paginate

# A stored PDF password (storage/passwords.py) is erased by whichever write ends the parse, done or failed.
LEASE = lease.LeasedTable(Document, "parse_attempts", held=DocumentStatus.parsing, waiting=DocumentStatus.uploaded,
                          failed=DocumentStatus.failed, on_end={"encrypted_password": None})


def lock_content(session: Session, sha256: str) -> None:
    """Serialize "add a document with this content" against "delete the last one", and two uploads
    of the same bytes against each other. Call it first in the transaction.

    Without it, a delete could remove the blob between an upload's write and its commit, and two
    owner-less uploads (auth off; NULLs escape the unique index) could both insert. Postgres: a
    transaction-scoped advisory lock per sha256. SQLite: the database's single write lock, taken now
    by a no-op UPDATE instead of at the first real write (after the reads it must cover).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:sha, 0))"), {"sha": sha256})
    elif dialect == "sqlite":
        session.execute(text("UPDATE documents SET sha256 = sha256 WHERE 0 = 1"))


# --- the API's queries ----------------------------------------------------------------------------

def get_document(session: Session, owner_id: uuid.UUID | None, document_id: uuid.UUID) -> Document | None:
    return session.scalars(
        select(Document).where(Document.id == document_id, owned(Document, owner_id))).one_or_none()


def find_by_sha256(session: Session, owner_id: uuid.UUID | None, sha256: str) -> Document | None:
    return session.scalars(
        select(Document).where(Document.sha256 == sha256, owned(Document, owner_id))
        .order_by(Document.created_at).limit(1)).first()


def find_by_idempotency_key(session: Session, owner_id: uuid.UUID | None, key: str) -> Document | None:
    return session.scalars(
        select(Document).where(Document.idempotency_key == key, owned(Document, owner_id))
        .order_by(Document.created_at).limit(1)).first()


def list_documents(session: Session, owner_id: uuid.UUID | None, *, limit: int,
                   cursor: str | None = None) -> ResultPage[Document]:
    return paginate(session, select(Document).where(owned(Document, owner_id)), Document, limit, cursor)


def reset_for_reparse(document: Document, encrypted_password: str | None) -> None:
    """A failed document goes back to `uploaded` (re-uploaded with the right password, stored encrypted
    until the parse ends); the caller sends its parse after the commit."""
    document.status = DocumentStatus.uploaded
    document.error_code = document.error_message = None
    document.lease_until = None
    document.encrypted_password = encrypted_password
    document.enqueued_at = utcnow()


def delete_document(session: Session, document: Document) -> tuple[list[uuid.UUID], bool]:
    """Delete the document (pages, chunks, jobs, results by ON DELETE CASCADE).

    Returns (ids of jobs that were still queued/running, whether its sha256 is now unused). The caller
    deletes the blob when unused, inside the same transaction and content lock.
    """
    lock_content(session, document.sha256)
    active = list(session.scalars(
        select(Job.id).where(Job.document_id == document.id, Job.status.in_(NON_TERMINAL))))
    sha256 = document.sha256
    session.execute(delete(Document).where(Document.id == document.id))
    session.expunge(document)
    remaining = session.scalar(select(func.count()).select_from(Document).where(Document.sha256 == sha256))
    return active, remaining == 0


def release_blob(session: Session, blobs: BlobStore, sha256: str) -> bool:
    """Delete the blob if no document uses it any more (own transaction, under the content lock).

    Run after the deleting transaction committed: if this never runs, a blob leaks (safe), but a
    document never loses its bytes.
    """
    lock_content(session, sha256)
    used = session.scalar(select(func.count()).select_from(Document).where(Document.sha256 == sha256))
    deleted = blobs.delete(sha256) if used == 0 else False
    session.commit()
    return deleted


# --- the parse's lease on a document --------------------------------------------------------------

def claim_document(session: Session, document_id: uuid.UUID, lease_s: float, *, reparse: bool = False) -> int | None:
    """uploaded -> parsing with a lease; returns the attempt number (fencing token), None if not claimable.

    reparse=True also claims a parsed or failed document (an explicit re-parse of the same bytes).
    """
    claimable = [DocumentStatus.uploaded]
    if reparse:
        claimable += [DocumentStatus.parsed, DocumentStatus.failed]
    return lease.claim(session, LEASE, document_id, lease_s, claimable=claimable)


def extend_document_lease(session: Session, document_id: uuid.UUID, attempt: int, lease_s: float) -> bool:
    """Heartbeat; False when the claim is no longer ours (reaped, deleted)."""
    return lease.extend(session, LEASE, document_id, attempt, lease_s)


def store_parsed_document(session: Session, document_id: uuid.UUID, attempt: int, parsed: ParsedDocument,
                          text: DocumentText) -> bool:
    """parsing -> parsed, replacing pages and chunks, in the caller's one transaction.

    The document's queued jobs are stamped sent in the same transaction: the parse body sends their
    message right after this commit, and a reconciler tick in between must not take jobs queued long
    before the parse for lost work and send them a second time.
    False (and nothing written) when the claim is no longer ours.
    """
    now = utcnow()
    if not lease.settle(session, LEASE, document_id, attempt, status=DocumentStatus.parsed,
                        media_type=parsed.media_type, pages=len(parsed.pages), needs_ocr_pages=parsed.needs_ocr_pages,
                        tokens=text.token_count, warnings=list(parsed.warnings), error_code=None,
                        error_message=None, updated_at=now):
        return False
    replace_text(session, document_id, parsed, text)
    session.execute(update(Job).where(Job.document_id == document_id, Job.status == JobStatus.queued)
                    .values(enqueued_at=now))
    return True


def fail_document(session: Session, document_id: uuid.UUID, attempt: int | None, code: str, message: str) -> bool:
    """-> failed with {code, message}. attempt=None fails it from any non-terminal state."""
    return lease.fail(session, LEASE, document_id, attempt, code, message,
                      unclaimed=[DocumentStatus.uploaded, DocumentStatus.parsing])


def release_document(session: Session, document_id: uuid.UUID, attempt: int) -> bool:
    """parsing -> uploaded (give the claim back, e.g. before a transient-error retry)."""
    return lease.release(session, LEASE, document_id, attempt)


# --- the reaper and the reconciler ------------------------------------------------------------------

def reap_expired_documents(session: Session, max_attempts: int,
                           now: datetime | None = None) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Parsing documents whose lease expired: back to uploaded, or failed `worker_lost` after
    max_attempts claims, failing their queued jobs too. Returns (requeued ids, failed ids)."""
    def fail_jobs(document_id: uuid.UUID, message: str) -> None:
        fail_queued_jobs(session, document_id, lease.WORKER_LOST, f"document failed to parse: {message}")

    return lease.reap_expired(
        session, LEASE, max_attempts, now or utcnow(), on_fail=fail_jobs,
        gave_up="the worker parsing this document vanished {attempts} time(s) (lease expired); giving up")


def stale_uploaded_documents(session: Session, grace_s: float, now: datetime | None = None) -> list[uuid.UUID]:
    """Uploaded documents whose parse message was last sent more than grace_s ago: the broker may have
    lost it. Their enqueued_at is stamped (the caller sends after the commit), so each is re-sent at
    most once per grace period, however often the reconciler runs (stale_queued_jobs says why the
    row's last send and not a look into the broker)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    doc_ids = list(session.scalars(select(Document.id).where(
        Document.status == DocumentStatus.uploaded, Document.enqueued_at < cutoff)))
    if doc_ids:
        session.execute(update(Document).where(Document.id.in_(doc_ids), Document.status == DocumentStatus.uploaded)
                        .values(enqueued_at=now))
    return doc_ids
