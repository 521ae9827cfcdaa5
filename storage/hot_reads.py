"""Reads on a request hot path (the job poll), from async code, without a thread hop on Postgres.

Postgres: psycopg's async driver on the event loop with its own small connection pool; the statement
is a SQLAlchemy Core select compiled once. Under load, handing a blocking query to a worker thread and
back cost more CPU than the query (GIL handoffs; bench/api_load.py), and SQLAlchemy's Connection and
Result layers as much again. The price is the Core types' result processing, which psycopg does not
need: uuid.UUID, dicts from JSONB and aware datetimes come from the driver; enum columns come back as
their str values. Other databases (SQLite in embedded mode) run the same statement through Core in the
thread pool.

The pool is ours (OnDemandPool), not psycopg_pool's: that one replaces dead connections from background
tasks that back off exponentially (1, 2, 4, 8, 16 s...) while the database is down, and a request only
waits for them; after a 20 s outage the poll answered 503 for ~11 s more. Here a request that finds no
idle connection connects itself, so the first poll after the database is back succeeds, and during an
outage the refusal is a fast 503 instead of a 2 s wait.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy import Dialect, Select
from starlette.concurrency import run_in_threadpool

from storage.db import get_engine, get_read_engine

# Connections per process for hot reads. Each query is one short round trip, and this box has 2 cores.
POOL_SIZE = 4
# How long a read waits for a free connection, or for the database to accept a new one, before
# failing (503). A refused connection fails at once; this bounds a host that does not answer at all.
CONNECT_TIMEOUT_S = 2.0


class PoolTimeout(psycopg.OperationalError):
    """No connection within CONNECT_TIMEOUT_S (an OperationalError: the API answers 503)."""


class OnDemandPool:
    """At most max_size connections; idle ones are reused, and a request that finds none opens one.

    Runs on one event loop (no locks: nothing here awaits between looking at and changing the idle
    list). No background tasks, no pings: a dead connection shows itself on use (fetch_one retries).
    """

    def __init__(self, kwargs: dict[str, Any], max_size: int, timeout: float) -> None:
        self.kwargs, self.max_size, self.timeout = kwargs, max_size, timeout
        self._idle: collections.deque[psycopg.AsyncConnection] = collections.deque()
        self._slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_size)
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout(f"no hot-read connection free within {self.timeout:.1f} s") from None
        conn: psycopg.AsyncConnection | None = None
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            yield conn
        finally:
            self._slots.release()
            if conn is not None:
                if conn.broken or conn.closed or conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    await conn.close()  # dead, or left mid-query by a canceled request
                else:
                    self._idle.append(conn)

    async def _connect(self) -> psycopg.AsyncConnection:
        try:
            async with asyncio.timeout(self.timeout):
                return await psycopg.AsyncConnection.connect(**self.kwargs, autocommit=True)
        except TimeoutError:
            raise PoolTimeout(f"the database did not accept a connection within {self.timeout:.1f} s") from None

    async def discard_idle(self) -> None:
        """Close every idle connection: after one died of a server restart, the others did too."""
        while self._idle:
            await self._idle.popleft().close()

    @property
    def idle(self) -> int:
        return len(self._idle)


class HotReads:
    """Hot-path reads for one database URL; close() runs in the app's lifespan."""

    def __init__(self, url: str) -> None:
        self.url = url
        engine = get_engine(url)
        self.dialect = engine.dialect
        connect_args = psycopg_connect_kwargs(url)
        self.pool = None if connect_args is None else OnDemandPool(connect_args, POOL_SIZE, CONNECT_TIMEOUT_S)

    async def open(self) -> None:
        """Nothing to do: connections open on first use, so a database that is down now only fails reads."""

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.discard_idle()

    async def fetch_one(self, statement: Select, params: dict[str, Any]) -> Mapping[str, Any] | None:
        """The first row of a read-only statement as {column: value}, or None."""
        if self.pool is None:
            return await run_in_threadpool(_core_fetch_one, self.url, statement, params)
        sql, keys = _compiled(statement, self.dialect)
        for attempt in (1, 2):
            async with self.pool.connection() as conn:
                try:
                    cursor = await conn.execute(sql, params)
                    row = await cursor.fetchone()
                    break
                except psycopg.OperationalError:
                    if attempt == 2 or not conn.broken:
                        raise
            # The connection had died (server restart, pg_terminate_backend) and was closed on return.
            # Drop the idle ones too, then read once more on a new connection: the statement writes
            # nothing, so running it again is safe, and a database still down fails that connect at once.
            await self.pool.discard_idle()
        return None if row is None else dict(zip(keys, row, strict=True))


def psycopg_connect_kwargs(url: str) -> dict[str, Any] | None:
    """psycopg.connect() arguments for a postgresql+psycopg URL (None for other databases)."""
    engine = get_engine(url)
    if engine.dialect.driver != "psycopg":
        return None
    connect_args = engine.dialect.create_connect_args(engine.url)[1]
    connect_args.pop("context", None)  # SQLAlchemy's adapters; plain psycopg types are what we want
    return connect_args


def _core_fetch_one(url: str, statement: Select, params: dict[str, Any]) -> Mapping[str, Any] | None:
    with get_read_engine(url).connect() as conn:
        row = conn.execute(statement, params).first()
    return None if row is None else dict(row._mapping)


@functools.lru_cache(maxsize=32)
def _compiled(statement: Select, dialect: Dialect) -> tuple[str, tuple[str, ...]]:
    return str(statement.compile(dialect=dialect)), tuple(statement.selected_columns.keys())
