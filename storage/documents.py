"""Repository functions for documents and jobs, as the HTTP routes use them.

Every query is scoped by owner: owner_id is the API key's id, or None when auth is off (then only
documents uploaded without a key are visible). Functions flush but never commit: the caller's unit
of work commits, and enqueues only after that.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, joinedload

from storage.blobs import BlobStore
from storage.hot_reads import HotReads
from storage.models import Document, DocumentStatus, Job, JobStatus, Result, TaskName, utcnow

NON_TERMINAL = (JobStatus.queued, JobStatus.running)
T = TypeVar("T")


class InvalidCursor(ValueError):
    """A pagination cursor that this server did not issue."""


@dataclass(frozen=True)
class Cursor:
    """Position after the last row of a page, in (created_at DESC, id DESC) order."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id.hex}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            created, ident = raw.split("|")
            return cls(datetime.fromisoformat(created), uuid.UUID(hex=ident))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidCursor(f"invalid cursor {token!r}") from exc


@dataclass
class ResultPage(Generic[T]):  # noqa: UP046 (PEP 695 syntax needs Python 3.12; we support 3.11)
    items: list[T]
    next_cursor: str | None


def _owned(model: type[Document] | type[Job], owner_id: uuid.UUID | None) -> ColumnElement[bool]:
    return model.owner_id.is_(None) if owner_id is None else model.owner_id == owner_id


def _paginate(session: Session, stmt: Any, model: type[Document] | type[Job], limit: int,
              cursor: str | None) -> ResultPage:
    if cursor:
        at = Cursor.decode(cursor)
        stmt = stmt.where(or_(model.created_at < at.created_at,
                              and_(model.created_at == at.created_at, model.id < at.id)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).unique())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = Cursor(rows[-1].created_at, rows[-1].id).encode() if more else None
    return ResultPage(rows, next_cursor)


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


# --- documents ---------------------------------------------------------------------------


def get_document(session: Session, owner_id: uuid.UUID | None, document_id: uuid.UUID) -> Document | None:
    return session.scalars(
        select(Document).where(Document.id == document_id, _owned(Document, owner_id))).one_or_none()


def find_by_sha256(session: Session, owner_id: uuid.UUID | None, sha256: str) -> Document | None:
    return session.scalars(
        select(Document).where(Document.sha256 == sha256, _owned(Document, owner_id))
        .order_by(Document.created_at).limit(1)).first()


def find_by_idempotency_key(session: Session, owner_id: uuid.UUID | None, key: str) -> Document | None:
    return session.scalars(
        select(Document).where(Document.idempotency_key == key, _owned(Document, owner_id))
        .order_by(Document.created_at).limit(1)).first()


def list_documents(session: Session, owner_id: uuid.UUID | None, *, limit: int,
                   cursor: str | None = None) -> ResultPage[Document]:
    return _paginate(session, select(Document).where(_owned(Document, owner_id)), Document, limit, cursor)


def reset_for_reparse(document: Document) -> None:
    """A failed document goes back to `uploaded` (e.g. re-uploaded with the right password)."""
    document.status = DocumentStatus.uploaded
    document.error_code = document.error_message = None
    document.lease_until = None


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


# --- jobs --------------------------------------------------------------------------------


def add_job(session: Session, document: Document, task: str, params: dict[str, Any]) -> Job:
    job = Job(document_id=document.id, owner_id=document.owner_id, task=TaskName(task), params=params,
              status=JobStatus.queued)
    session.add(job)
    return job


def get_job(session: Session, owner_id: uuid.UUID | None, job_id: uuid.UUID) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, _owned(Job, owner_id))).one_or_none()


def _job_view_statement(owned: ColumnElement[bool]) -> Select:
    jobs, results = Job.__table__, Result.__table__
    return (select(*(jobs.c[name] for name in JOB_VIEW_COLUMNS), results.c.payload.label("result"))
            .select_from(jobs.outerjoin(results, results.c.job_id == jobs.c.id))
            .where(jobs.c.id == bindparam("job_id"), owned))


# What a poll returns: the jobs columns JobPublic shows, plus the result payload (NULL until succeeded).
JOB_VIEW_COLUMNS = ("id", "document_id", "task", "params", "status", "progress", "stage", "error_code",
                    "error_message", "attempts", "created_at", "updated_at", "started_at", "finished_at")
# Built once: a statement object reused as is skips SQLAlchemy's per-call where-clause construction
# and result-column matching, which cost more CPU than the query itself (bench/api_load.py).
_JOB_VIEW_OWNED = _job_view_statement(Job.__table__.c.owner_id == bindparam("owner_id"))
_JOB_VIEW_UNOWNED = _job_view_statement(Job.__table__.c.owner_id.is_(None))


async def get_job_view(reads: HotReads, owner_id: uuid.UUID | None, job_id: uuid.UUID) -> Mapping[str, Any] | None:
    """The poll path: the job's shown columns and its result payload (key "result") in one SELECT,
    no ORM, no session (storage/hot_reads.py). "task" and "status" may be plain str values."""
    if owner_id is None:
        return await reads.fetch_one(_JOB_VIEW_UNOWNED, {"job_id": job_id})
    return await reads.fetch_one(_JOB_VIEW_OWNED, {"job_id": job_id, "owner_id": owner_id})


def list_jobs(session: Session, owner_id: uuid.UUID | None, *, limit: int, cursor: str | None = None,
              document_id: uuid.UUID | None = None, status: JobStatus | None = None) -> ResultPage[Job]:
    stmt = select(Job).options(joinedload(Job.result)).where(_owned(Job, owner_id))
    if document_id is not None:
        stmt = stmt.where(Job.document_id == document_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return _paginate(session, stmt, Job, limit, cursor)


def cancel_job(session: Session, job: Job) -> bool:
    """Atomically move a queued/running job to canceled; False if it was already terminal.

    A conditional UPDATE, so a worker finishing the job at the same moment cannot be overwritten.
    """
    now = utcnow()
    result = session.execute(
        update(Job).where(Job.id == job.id, Job.status.in_(NON_TERMINAL))
        .values(status=JobStatus.canceled, finished_at=now, updated_at=now, lease_until=None)
        .execution_options(synchronize_session=False))
    session.refresh(job)
    return result.rowcount == 1


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
