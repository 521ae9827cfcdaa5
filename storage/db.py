"""Engine and session factory. One engine per process and URL; sessions are short-lived.

`pool_pre_ping` stays on: its `SELECT 1` per checkout costs a round trip and ~0.06-0.1 ms of CPU
(a sync micro-benchmark, bench/RESULTS.md), which did not show above run-to-run noise on the ORM
routes (GET /v1/documents/{id}: ~2.5-2.8 ms of CPU per request either way), and it lets sessions,
uploads and the workers ride over a database restart without an error. The job poll, where that cost
would count, does not use this pool (storage/hot_reads.py: no ping, one retry after a dead connection).

A Postgres connect gives up after CONNECT_TIMEOUT_S unless the URL sets `connect_timeout`: without
one, a host that drops packets holds a thread (of the API's POOL_SIZE) per request for the kernel's
TCP timeout (minutes) instead of answering 503.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

# Connections kept open per process. The API caps its thread pool at this (api/app.py): more threads
# than pooled connections would open and close an overflow connection per request under load.
POOL_SIZE = 10
# Seconds (libpq wants an integer, at least 2).
CONNECT_TIMEOUT_S = 5


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
    connect_args = {} if "connect_timeout" in make_url(url).query else {"connect_timeout": CONNECT_TIMEOUT_S}
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=20, connect_args=connect_args)


def get_read_engine(url: str) -> Engine:
    """The same pool in autocommit mode: a lone SELECT needs no BEGIN/ROLLBACK round trips."""
    return _autocommit(get_engine(url))


@functools.lru_cache(maxsize=8)
def _autocommit(engine: Engine) -> Engine:
    # Keyed by the engine, not the URL, so it follows get_engine.cache_clear() (forked workers).
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return _sessionmaker(get_engine(url))


def get_read_sessionmaker(url: str) -> sessionmaker[Session]:
    """Sessions on the autocommit engine: each SELECT runs alone, with no BEGIN/ROLLBACK round trips."""
    return _sessionmaker(get_read_engine(url))


@functools.lru_cache(maxsize=16)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Keyed by the engine, so both factories follow get_engine.cache_clear() (forked workers).
    return sessionmaker(engine, expire_on_commit=False)


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
