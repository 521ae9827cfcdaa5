"""The fenced lease, written once for the two leased tables: documents while they parse, jobs while they run.

A claim is one conditional UPDATE that moves a row from a claimable status to the table's held status,
bumps its attempt counter and sets `lease_until`; that attempt number is the fencing token every later
write presents (`fence`). A holder whose lease was taken over (the reaper re-queued it, the API
canceled it, the row was deleted) finds its writes match no row and stops. Every state change here is
a conditional UPDATE, so two workers (or a worker and the reaper) can never both win.
Times are UTC from this process's clock, as the models' defaults are.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from storage.models import Document, Job, utcnow

# The error code of a row whose holder vanished (its lease expired) max_attempts times.
WORKER_LOST = "worker_lost"
ERROR_MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class LeasedTable:
    """How one table spells the lease: its model, attempt counter and the statuses a claim moves between."""

    model: type[Document] | type[Job]
    attempts: str  # the attempt counter's column (the fencing token)
    held: str  # status while a worker holds the claim
    waiting: str  # status a handed-back or re-queued row returns to
    failed: str
    # Columns cleared whenever a claim is handed back or re-queued (e.g. the job's worker_id).
    on_release: Mapping[str, Any] = field(default_factory=dict)
    # Columns cleared whenever the row's work ends, done or failed (settle, fail, reap's give-up): e.g. the
    # document's stored password, which only the parse needs.
    on_end: Mapping[str, Any] = field(default_factory=dict)
    # Whether terminal writes (fail) also stamp `finished_at`.
    stamps_finish: bool = False


def lease_until(lease_s: float) -> datetime:
    return utcnow() + timedelta(seconds=lease_s)


def fence(table: LeasedTable, row_id: uuid.UUID, attempt: int) -> tuple[ColumnElement[bool], ...]:
    """The WHERE clause of a write made under a claim: still held, by this attempt."""
    model = table.model
    return model.id == row_id, model.status == table.held, getattr(model, table.attempts) == attempt


def _update(session: Session, table: LeasedTable, where: Sequence[ColumnElement[bool]], **values: Any) -> bool:
    return session.execute(update(table.model).where(*where).values(**values)).rowcount == 1


def _terminal_stamps(table: LeasedTable, now: datetime) -> dict[str, datetime]:
    return {"finished_at": now, "updated_at": now} if table.stamps_finish else {"updated_at": now}


def claim(session: Session, table: LeasedTable, row_id: uuid.UUID, lease_s: float, *,
          claimable: Sequence[str], where: Sequence[ColumnElement[bool]] = (),
          values: Mapping[str, Any] | None = None) -> int | None:
    """claimable -> held with a lease and attempts+1; returns the attempt number (fencing token), None if
    the row is not claimable. `where` adds conditions, `values` sets more columns."""
    model = table.model
    attempts = getattr(model, table.attempts)
    row = session.execute(
        update(model).where(model.id == row_id, model.status.in_(claimable), *where)
        .values({"status": table.held, table.attempts: attempts + 1, "lease_until": lease_until(lease_s),
                 "updated_at": utcnow(), **(values or {})})
        .returning(attempts)
    ).first()
    return None if row is None else int(row[0])


def extend(session: Session, table: LeasedTable, row_id: uuid.UUID, attempt: int, lease_s: float,
           **values: Any) -> bool:
    """Heartbeat (and set `values`); False when the claim is no longer ours (reaped, canceled, deleted)."""
    return _update(session, table, fence(table, row_id, attempt), lease_until=lease_until(lease_s), **values)


def settle(session: Session, table: LeasedTable, row_id: uuid.UUID, attempt: int, **values: Any) -> bool:
    """The holder's outcome: set `values` and end the lease, fenced; False (nothing written) when the
    claim is no longer ours."""
    return _update(session, table, fence(table, row_id, attempt), lease_until=None, **table.on_end, **values)


def release(session: Session, table: LeasedTable, row_id: uuid.UUID, attempt: int, **values: Any) -> bool:
    """held -> waiting: give the claim back (e.g. before a transient-error retry).

    enqueued_at is stamped: the retry's message follows (Celery's retry; in embedded mode the reconciler's
    re-send after the grace).
    """
    now = utcnow()
    return _update(session, table, fence(table, row_id, attempt), status=table.waiting, lease_until=None,
                   updated_at=now, enqueued_at=now, **table.on_release, **values)


def fail(session: Session, table: LeasedTable, row_id: uuid.UUID, attempt: int | None, code: str, message: str,
         *, unclaimed: Sequence[str]) -> bool:
    """-> failed with {code, message}, fenced by attempt; attempt=None fails it from one of the `unclaimed`
    statuses, without a claim."""
    model = table.model
    where = (fence(table, row_id, attempt) if attempt is not None
             else (model.id == row_id, model.status.in_(unclaimed)))
    return _update(session, table, where, status=table.failed, error_code=code,
                   error_message=message[:ERROR_MESSAGE_CHARS], lease_until=None, **table.on_end,
                   **_terminal_stamps(table, utcnow()))


def reap_expired(session: Session, table: LeasedTable, max_attempts: int, now: datetime, *, gave_up: str,
                 requeue_values: Mapping[str, Any] | None = None,
                 on_fail: Callable[[uuid.UUID, str], None] | None = None) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Held rows whose lease expired before `now` (their holder vanished): back to waiting, or failed
    `worker_lost` once max_attempts claims were made. Returns (requeued ids, failed ids).

    Each row changes with its own fenced UPDATE that re-checks the expiry, so concurrent reapers do not
    double-act. gave_up is the failure message, formatted with {attempts}; on_fail(row_id, message) runs
    after each failure, in the same transaction.
    """
    model = table.model
    expired = session.execute(select(model.id, getattr(model, table.attempts)).where(
        model.status == table.held, model.lease_until < now)).all()
    requeued: list[uuid.UUID] = []
    failed: list[uuid.UUID] = []
    for row_id, attempts in expired:
        where = (*fence(table, row_id, attempts), model.lease_until < now)
        if attempts >= max_attempts:
            message = gave_up.format(attempts=attempts)
            if _update(session, table, where, status=table.failed, error_code=WORKER_LOST, error_message=message,
                       lease_until=None, **table.on_end, **_terminal_stamps(table, now)):
                if on_fail is not None:
                    on_fail(row_id, message)
                failed.append(row_id)
        elif _update(session, table, where, status=table.waiting, lease_until=None, updated_at=now,
                     enqueued_at=now, **table.on_release, **(requeue_values or {})):  # the caller re-sends it
            requeued.append(row_id)
    return requeued, failed
