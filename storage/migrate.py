"""Alembic migrations driven from code: `longdoc db upgrade` and the API's startup check use this.

The script directory is resolved from this file (repo_root/alembic), so migrations work from an
editable install and from any working directory, without an alembic.ini on the path.
"""

from __future__ import annotations

import logging
from pathlib import Path

# alembic logs one INFO line per autogenerate plugin while it is imported: noise for `longdoc db`.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import create_engine, make_url  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from alembic import command  # noqa: E402

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT_LOCATION = REPO_ROOT / "alembic"


class DatabaseNotMigrated(RuntimeError):
    """The database schema is missing or older than the code: run `longdoc db upgrade`."""


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # "%" is ConfigParser interpolation syntax; escape it so URLs with encoded passwords survive.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _ensure_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str, revision: str = "head") -> None:
    _ensure_sqlite_dir(url)
    log.info("upgrading %s to %s", safe_url(url), revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    log.info("downgrading %s to %s", safe_url(url), revision)
    command.downgrade(alembic_config(url), revision)


def head() -> str:
    """The newest revision the code knows."""
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"expected one migration head, found {heads}")
    return heads[0]


def current(url: str) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    _ensure_sqlite_dir(url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def assert_up_to_date(url: str) -> None:
    """Raise DatabaseNotMigrated unless the database is at the code's head revision.

    Connection errors propagate unchanged (the caller decides whether an unreachable DB is fatal).
    """
    at, expected = current(url), head()
    if at != expected:
        state = "has no schema" if at is None else f"is at revision {at}"
        raise DatabaseNotMigrated(
            f"database {safe_url(url)} {state}, but this code needs revision {expected}: "
            "run `longdoc db upgrade` (with the same LONGDOC_DATABASE_URL) and start again")
