"""The lease a body holds on its claimed row: renewed by a heartbeat thread while the body works, and
the one block both bodies (parse, job) run under it (run_leased)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.orm import Session

from pipeline.types import PipelineError
from storage.db import session_scope
from workers.failures import INTERNAL_ERROR, TRANSIENT_ERRORS, JobAborted

log = logging.getLogger(__name__)
T = TypeVar("T")


def worker_id() -> str:
    """host:pid:thread, recorded on a claimed job so an operator can find the process that holds it."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    """A message carries ids as strings."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def with_session(url: str, fn: Callable[[Session], T]) -> T:
    """fn in its own unit of work (committed on return)."""
    with session_scope(url) as s:
        return fn(s)


def give_back(url: str, fn: Callable[[Session], bool], what: str) -> None:
    """Hand a claim back before a retry; if the DB is down too, the lease expiry lets the reaper do it."""
    try:
        with_session(url, fn)
    except Exception as exc:
        log.warning("could not hand back claim on %s (the reaper will): %s", what, exc)


class Lease:
    """Extends a lease every lease_s/3 in a daemon thread; `lost` is set once the claim is no longer ours."""

    def __init__(self, extend: Callable[[], bool], lease_s: float, what: str) -> None:
        self._extend, self._interval, self._what = extend, max(0.2, lease_s / 3), what
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{what}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._extend():
                    log.warning("%s: claim lost (canceled, re-queued or deleted)", self._what)
                    self.lost.set()
                    return
            except Exception as exc:  # a DB blip: keep trying; the lease covers a few missed beats
                log.warning("%s: heartbeat failed: %s", self._what, exc)


@dataclass(frozen=True)
class LeasedRow:
    """A row this worker holds, and what each outcome writes under its fencing token."""

    what: str  # "parse <id>" / "job <id>": the log prefix
    url: str
    lease_s: float
    extend: Callable[[Session], bool]  # the heartbeat: False once the claim is gone
    give_back: Callable[[Session], bool]  # before a transient-error retry
    fail: Callable[[str, str], str]  # records {code, message}; returns the status to report
    lost: str  # the status to report when the claim is gone


def run_leased(row: LeasedRow, work: Callable[[Lease], T], store: Callable[[Session, T], bool],
               stored: Callable[[T], str]) -> str:
    """work(lease) under a heartbeat, then store(session, result) fenced in one transaction, then
    stored(result) (after the commit). Returns the status to report.

    PipelineError -> row.fail(code, message); TRANSIENT_ERRORS -> the claim is handed back and the
    error re-raised (the transport retries); JobAborted, or a store that matches no row -> row.lost;
    anything else is logged and fails with INTERNAL_ERROR.
    """
    with Lease(lambda: with_session(row.url, row.extend), row.lease_s, row.what) as lease:
        try:
            result = work(lease)
        except JobAborted:
            log.info("%s: %s (canceled or taken over)", row.what, row.lost)
            return row.lost
        except PipelineError as exc:
            return row.fail(exc.code, exc.message)
        except TRANSIENT_ERRORS:
            give_back(row.url, row.give_back, row.what)
            raise
        except Exception as exc:
            log.exception("%s: unexpected error", row.what)
            return row.fail(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    try:
        with session_scope(row.url) as s:
            done = store(s, result)
    except TRANSIENT_ERRORS:
        give_back(row.url, row.give_back, row.what)
        raise
    if not done:
        # Also how a cancel that lands after the work ended shows: the fenced store matches no row.
        log.warning("%s: %s: the claim was lost before the result was stored (canceled, re-queued or "
                    "deleted); result dropped", row.what, row.lost)
        return row.lost
    return stored(result)
