"""Alembic migrations on Postgres and SQLite: upgrade from empty, schema == storage/models.py exactly,
downgrade/upgrade round trip with data kept by the re-upgrade, and `longdoc db` from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from storage import keys, migrate
from storage.db import session_scope
from storage.models import ApiKey, Base

TABLES = {"api_keys", "documents", "pages", "chunks", "jobs", "results"}


@pytest.fixture(params=["postgres", "sqlite"])
def empty_db_url(request, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'nested' / 'longdoc.db'}"  # parent dir does not exist yet


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_models_exactly(empty_db_url):
    assert migrate.current(empty_db_url) is None
    with pytest.raises(migrate.DatabaseNotMigrated, match="has no schema.*run `longdoc db upgrade`"):
        migrate.assert_up_to_date(empty_db_url)
    migrate.upgrade(empty_db_url)
    assert migrate.current(empty_db_url) == migrate.head()
    migrate.assert_up_to_date(empty_db_url)
    assert _tables(empty_db_url) == TABLES
    assert _schema_diff(empty_db_url) == []  # the migration is storage/models.py, column for column


def test_downgrade_upgrade_round_trip(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    assert migrate.current(empty_db_url) is None and _tables(empty_db_url) == set()
    migrate.upgrade(empty_db_url)
    assert _tables(empty_db_url) == TABLES and _schema_diff(empty_db_url) == []
    with session_scope(empty_db_url) as session:  # the round-tripped schema takes real rows
        _, secret = keys.create_key(session, "after-round-trip")
    with session_scope(empty_db_url) as session:
        assert keys.authenticate(session, secret).name == "after-round-trip"
        assert session.query(ApiKey).count() == 1


def test_partial_schema_is_reported_with_its_revision(pg_url):
    migrate.upgrade(pg_url)
    engine = create_engine(pg_url, poolclass=NullPool)
    with engine.begin() as conn:  # a database stamped by some other (older or newer) code
        conn.execute(text("UPDATE alembic_version SET version_num = 'abc123'"))
    engine.dispose()
    with pytest.raises(migrate.DatabaseNotMigrated, match="is at revision abc123.*needs revision"):
        migrate.assert_up_to_date(pg_url)


def test_longdoc_db_commands_work_from_any_directory(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "LONGDOC_DATABASE_URL": url, "LONGDOC_DATA_DIR": str(tmp_path)}
    cli = [sys.executable, "-m", "longdoc.cli", "--log-level", "WARNING"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert run("db", "current").returncode == 1
    up = run("db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert migrate.current(url) == migrate.head()
    created = run("keys", "create", "ci-bot")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    with session_scope(url) as session:
        assert keys.authenticate(session, secret).name == "ci-bot"
    listed = run("keys", "list")
    assert "ci-bot" in listed.stdout and secret not in listed.stdout
    key_id = listed.stdout.splitlines()[1].split()[0]
    assert run("keys", "revoke", key_id).returncode == 0
    with session_scope(url) as session:
        assert keys.authenticate(session, secret) is None
