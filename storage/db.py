"""Engine and session factory. One engine per process and URL; sessions are short-lived.

No `pool_pre_ping`: its `SELECT 1` per checkout was a round trip and ~0.1 ms of CPU on every API
request (bench/api_load.py). A pooled connection that died (server restart, pg_terminate_backend)
fails its first statement instead; SQLAlchemy then invalidates the whole pool, so the next checkout
connects afresh. That first failure is a 503 in the API (api/errors.py), a transient retry in the
workers (workers/bodies.py); idempotent reads retry it at once (`read_with_reconnect`, and
storage/hot_reads.py for the job poll).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

# Connections kept open per process. The API caps its thread pool at this (api/app.py): more threads
# than pooled connections would open and close an overflow connection per request under load.
POOL_SIZE = 10
# Replace connections older than this, before a server-side or firewall idle timeout kills them.
POOL_RECYCLE_S = 1800


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            # WAL lets the API read while an in-process task writes; FKs are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_size=POOL_SIZE, max_overflow=20, pool_recycle=POOL_RECYCLE_S)


def get_read_engine(url: str) -> Engine:
    """The same pool in autocommit mode: a lone SELECT needs no BEGIN/ROLLBACK round trips."""
    return _autocommit(get_engine(url))


@functools.lru_cache(maxsize=8)
def _autocommit(engine: Engine) -> Engine:
    # Keyed by the engine, not the URL, so it follows get_engine.cache_clear() (forked workers).
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def read_with_reconnect(url: str, query: Callable[[Connection], T]) -> T:
    """Run a read-only `query` on an autocommit connection, once more on a fresh one if the pooled
    connection turned out to be dead (safe only because the query writes nothing)."""
    try:
        with get_read_engine(url).connect() as conn:
            return query(conn)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with get_read_engine(url).connect() as conn:
        return query(conn)


@functools.lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
