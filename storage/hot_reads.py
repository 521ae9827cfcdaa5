"""Reads on a request hot path (the job poll), from async code, without a thread hop on Postgres.

Postgres: psycopg's async driver on the event loop with its own small connection pool; the statement
is a SQLAlchemy Core select compiled once. Under load, handing a blocking query to a worker thread and
back cost more CPU than the query (GIL handoffs; bench/api_load.py), and SQLAlchemy's Connection and
Result layers as much again. The price is the Core types' result processing, which psycopg does not
need: uuid.UUID, dicts from JSONB and aware datetimes come from the driver; enum columns come back as
their str values. Other databases (SQLite in embedded mode) run the same statement through Core in the
thread pool.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Dialect, Select
from starlette.concurrency import run_in_threadpool

from storage.db import get_engine, get_read_engine

# Connections per process for hot reads. Each query is one short round trip, and this box has 2 cores.
POOL_SIZE = 4
# How long a read waits for a free connection (or for the database to accept one) before failing (503).
CONNECT_TIMEOUT_S = 2.0


class HotReads:
    """Hot-path reads for one database URL; open() and close() run in the app's lifespan."""

    def __init__(self, url: str) -> None:
        self.url = url
        engine = get_engine(url)
        self.dialect = engine.dialect
        self.pool: AsyncConnectionPool | None = None
        if self.dialect.driver == "psycopg":
            connect_args = self.dialect.create_connect_args(engine.url)[1]
            connect_args.pop("context", None)  # SQLAlchemy's adapters; plain psycopg types are what we want
            self.pool = AsyncConnectionPool(kwargs={**connect_args, "autocommit": True}, min_size=1,
                                            max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT_S, open=False,
                                            name="longdoc-hot-reads")

    async def open(self) -> None:
        """Start connecting in the background; a database that is down now only fails the reads (503)."""
        if self.pool is not None:
            await self.pool.open(wait=False)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

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
            # The connection had died (server restart, pg_terminate_backend); the pool drops it on return.
            # Check the idle ones too (a restart kills them all), then read once more: the statement
            # writes nothing, so running it again is safe.
            await self.pool.check()
        return None if row is None else dict(zip(keys, row, strict=True))


def _core_fetch_one(url: str, statement: Select, params: dict[str, Any]) -> Mapping[str, Any] | None:
    with get_read_engine(url).connect() as conn:
        row = conn.execute(statement, params).first()
    return None if row is None else dict(row._mapping)


@functools.lru_cache(maxsize=32)
def _compiled(statement: Select, dialect: Dialect) -> tuple[str, tuple[str, ...]]:
    return str(statement.compile(dialect=dialect)), tuple(statement.selected_columns.keys())
