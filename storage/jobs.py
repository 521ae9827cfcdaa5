"""Job queries: what the API asks (create, read, list, cancel) and the lease a gpu worker holds on a job.

API-side functions flush but never commit: the caller's unit of work commits, and enqueues only after
that; every API read is scoped by owner (storage/paging.py). Worker-side writes go through the fenced
lease (storage/lease.py): a claim moves `queued -> running` and bumps `attempts`, the fencing token
every later write of that worker presents.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, exists, insert, select, update
from sqlalchemy.orm import Session, joinedload

from storage import lease
from storage.hot_reads import HotReads
from storage.models import Document, DocumentStatus, Job, JobStatus, Result, TaskName, utcnow
from storage.paging import ResultPage, owned, paginate

NON_TERMINAL = (JobStatus.queued, JobStatus.running)
LEASE = lease.LeasedTable(Job, "attempts", held=JobStatus.running, waiting=JobStatus.queued,
                          failed=JobStatus.failed, on_release={"worker_id": None}, stamps_finish=True)


# --- the API's queries ----------------------------------------------------------------------------

def add_job(session: Session, document: Document, task: str, params: dict[str, Any],
            idempotency_key: str | None = None) -> Job:
    job = Job(document_id=document.id, owner_id=document.owner_id, task=TaskName(task), params=params,
              status=JobStatus.queued, idempotency_key=idempotency_key)
    session.add(job)
    return job


def get_job(session: Session, owner_id: uuid.UUID | None, job_id: uuid.UUID) -> Job | None:
    return session.scalars(select(Job).where(Job.id == job_id, owned(Job, owner_id))).one_or_none()


def _job_view_statement(owner_clause: ColumnElement[bool]) -> Select:
    jobs, results = Job.__table__, Result.__table__
    return (select(*(jobs.c[name] for name in JOB_VIEW_COLUMNS), results.c.payload.label("result"))
            .select_from(jobs.outerjoin(results, results.c.job_id == jobs.c.id))
            .where(jobs.c.id == bindparam("job_id"), owner_clause))


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
    stmt = select(Job).options(joinedload(Job.result)).where(owned(Job, owner_id))
    if document_id is not None:
        stmt = stmt.where(Job.document_id == document_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return paginate(session, stmt, Job, limit, cursor)


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


# --- a document's waiting jobs --------------------------------------------------------------------

def queued_job_ids(session: Session, document_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(Job.id).where(Job.document_id == document_id,
                                                     Job.status == JobStatus.queued).order_by(Job.created_at)))


def queued_jobs_to_send(session: Session, document_id: uuid.UUID, *,
                        unless_sent_within_s: float | None = None) -> list[uuid.UUID]:
    """The document's queued jobs, oldest first, stamped enqueued now: the caller sends one message for
    them after the commit (the gpu body claims every queued job of the message's document).

    unless_sent_within_s: none (an empty list) when every one of them was sent that recently.
    """
    now = utcnow()
    query = select(Job.id, Job.enqueued_at).where(Job.document_id == document_id, Job.status == JobStatus.queued)
    rows = session.execute(query.order_by(Job.created_at)).all()
    if unless_sent_within_s is not None:
        cutoff = now - timedelta(seconds=unless_sent_within_s)
        if all(_aware(sent) >= cutoff for _, sent in rows):
            return []
    job_ids = [job_id for job_id, _ in rows]
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.queued).values(enqueued_at=now))
    return job_ids


def _aware(at: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time stored is UTC.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def requeue_jobs_failed_with(session: Session, document_id: uuid.UUID, codes: Collection[str]) -> int:
    """Failed jobs of the document whose error is one of `codes` (its parse's password failures) go back
    to queued, to be released by the document's next parse. `attempts` stays as it is: it only grows,
    so a claim from before can never match the fence of the next one."""
    now = utcnow()
    result = session.execute(
        update(Job).where(Job.document_id == document_id, Job.status == JobStatus.failed, Job.error_code.in_(codes))
        .values(status=JobStatus.queued, error_code=None, error_message=None, finished_at=None, started_at=None,
                lease_until=None, worker_id=None, progress=0.0, stage=None, updated_at=now, enqueued_at=now))
    return result.rowcount


def fail_queued_jobs(session: Session, document_id: uuid.UUID, code: str, message: str) -> int:
    """A document that failed to parse fails its waiting jobs with the document's error."""
    now = utcnow()
    result = session.execute(update(Job).where(Job.document_id == document_id, Job.status == JobStatus.queued)
                             .values(status=JobStatus.failed, error_code=code,
                                     error_message=message[:lease.ERROR_MESSAGE_CHARS],
                                     finished_at=now, updated_at=now))
    return result.rowcount


# --- the gpu worker's lease on a job --------------------------------------------------------------

def claim_job(session: Session, job_id: uuid.UUID, worker_id: str, lease_s: float) -> int | None:
    """queued -> running (attempts+1, lease, worker_id) when its document is parsed; returns the attempt."""
    now = utcnow()
    document_parsed = exists().where(Document.id == Job.document_id, Document.status == DocumentStatus.parsed)
    return lease.claim(session, LEASE, job_id, lease_s, claimable=[JobStatus.queued], where=[document_parsed],
                       values={"worker_id": worker_id[:255], "started_at": now, "progress": 0.0,
                               "stage": "starting", "updated_at": now})


def heartbeat_job(session: Session, job_id: uuid.UUID, attempt: int, lease_s: float,
                  progress: float | None = None, stage: str | None = None) -> bool:
    """Extend the lease (and record progress); False when canceled, reaped or deleted."""
    values: dict[str, Any] = {}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    if stage is not None:
        values["stage"] = stage[:64]
    return lease.extend(session, LEASE, job_id, attempt, lease_s, **values)


def has_result(session: Session, job_id: uuid.UUID) -> bool:
    return session.scalar(select(exists().where(Result.job_id == job_id))) is True


def complete_job(session: Session, job_id: uuid.UUID, attempt: int, payload: dict[str, Any] | None) -> bool:
    """running -> succeeded and the Result row, in the caller's one transaction.

    payload=None marks it succeeded without writing (the result already exists from an earlier attempt).
    False when the claim is no longer ours: nothing is written.
    """
    now = utcnow()
    if not lease.settle(session, LEASE, job_id, attempt, status=JobStatus.succeeded, progress=1.0, stage="done",
                        finished_at=now, error_code=None, error_message=None, updated_at=now):
        return False
    if payload is not None:
        session.execute(insert(Result).values(job_id=job_id, payload=payload, created_at=now))
    return True


def fail_job(session: Session, job_id: uuid.UUID, attempt: int | None, code: str, message: str) -> bool:
    """-> failed with {code, message}. attempt=None fails a queued job (no claim held)."""
    return lease.fail(session, LEASE, job_id, attempt, code, message, unclaimed=[JobStatus.queued])


def requeue_job(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """running -> queued (give the claim back before a transient-error retry)."""
    return lease.release(session, LEASE, job_id, attempt, stage="retrying")


# --- the reaper and the reconciler ------------------------------------------------------------------

def reap_expired_jobs(session: Session, max_attempts: int,
                      now: datetime | None = None) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Running jobs whose lease expired: re-queued, or failed `worker_lost` after max_attempts claims.
    Returns (requeued ids, failed ids)."""
    return lease.reap_expired(
        session, LEASE, max_attempts, now or utcnow(), requeue_values={"stage": "requeued"},
        gave_up="the worker running this job vanished {attempts} time(s) (lease expired); giving up")


def stale_queued_jobs(session: Session, grace_s: float, now: datetime | None = None) -> list[uuid.UUID]:
    """Queued jobs of parsed documents whose message was last sent more than grace_s ago: the broker may
    have lost it. Returns one job per such document (its message runs all of the document's queued
    jobs) and stamps every queued job of those documents enqueued now, so the same work is re-sent at
    most once per grace period however often the reconciler runs.

    Why the row's last send, not a look into the broker: whether a message is really gone cannot be
    read reliably from Redis (a worker holds prefetched and ETA messages in kombu's unacked hash; a
    message is in neither place between BRPOP and that hash; the layout is kombu's, not an API), and
    a duplicate is a no-op (its claim matches no row). So the cost of a message that was not lost is
    bounded at one extra delivery per grace period; choose the grace longer than work usually waits.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    stale = (select(Job.document_id).join(Document, Document.id == Job.document_id)
             .where(Job.status == JobStatus.queued, Job.enqueued_at < cutoff,
                    Document.status == DocumentStatus.parsed).distinct())
    rows = session.execute(select(Job.document_id, Job.id).where(
        Job.status == JobStatus.queued, Job.document_id.in_(stale)).order_by(Job.created_at)).all()
    first: dict[uuid.UUID, uuid.UUID] = {}
    for document_id, job_id in rows:
        first.setdefault(document_id, job_id)
    if first:
        session.execute(update(Job).where(Job.document_id.in_(list(first)), Job.status == JobStatus.queued)
                        .values(enqueued_at=now))
    return list(first.values())


def one_job_per_document(session: Session, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The first of `job_ids` (in their order) of each document: a message for it runs all of that
    document's queued jobs, so the others' messages would only be no-ops."""
    if not job_ids:
        return []
    document_of = dict(session.execute(select(Job.id, Job.document_id).where(Job.id.in_(job_ids))).all())
    first: dict[uuid.UUID, uuid.UUID] = {}
    for job_id in job_ids:
        if job_id in document_of:
            first.setdefault(document_of[job_id], job_id)
    return list(first.values())


def fail_jobs_of_failed_documents(session: Session) -> None:
    """Queued jobs whose document failed (a release the parse did not get to) fail with its error."""
    failed_docs = session.execute(select(Document.id, Document.error_code, Document.error_message).where(
        Document.status == DocumentStatus.failed,
        exists().where(Job.document_id == Document.id, Job.status == JobStatus.queued))).all()
    for doc_id, code, message in failed_docs:
        fail_queued_jobs(session, doc_id, code or "parse_error", f"document failed to parse: {message or code}")
