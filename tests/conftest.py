"""Shared fixtures: the real corpus, a fresh Postgres database, a Redis database.

Area-specific fixtures live in tests/fixtures_*.py modules, loaded below as plugins.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

# Triton kernels (pipeline/engine/fused.py, backends/splitk.py) run through Triton's CPU interpreter
# where there is no GPU. Triton reads this when it is first imported, which some test may do early.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_BASE_URL = "redis://127.0.0.1:6379"

pytest_plugins = [f"tests.{p.stem}" for p in sorted((REPO_ROOT / "tests").glob("fixtures_*.py"))]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    assert CORPUS_DIR.is_dir(), f"shared corpus not found at {CORPUS_DIR}"
    return CORPUS_DIR


def _create_pg_database() -> str:
    name = f"longdoc_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name


def _drop_pg_database(name: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test (migrations are the test's business)."""
    name = _create_pg_database()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _drop_pg_database(name)


@contextmanager
def flushed_redis_db(db: int) -> Iterator[str]:
    """The URL of Redis database `db`, emptied before and after use."""
    import redis

    url = f"{REDIS_BASE_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """Redis db 15, emptied before and after the test."""
    with flushed_redis_db(15) as url:
        yield url
