"""API fixtures: a migrated Postgres DB, service-mode settings on real Redis, the real app, API keys.

Service mode (broker set) so uploads send real Celery messages to Redis and nothing runs in-process:
the API tests stop at the API/DB boundary (the worker flow is tested in the workers' tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from api.app import create_app
from config.settings import Settings
from storage import keys, migrate
from storage.db import session_scope
from tests.conftest import flushed_redis_db

SMALL_PDF = "contract-ivillage-sponsorship.pdf"
OTHER_PDF = "contract-galera-joint-filing.pdf"


@pytest.fixture
def migrated_pg(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


@pytest.fixture
def api_redis_url() -> Iterator[str]:
    """Redis db 13, emptied around each test: the API tests count messages per queue, so they must not
    share a database with other areas' tests (db 15), whose workers consume from it."""
    with flushed_redis_db(13) as url:
        yield url


@pytest.fixture
def api_settings(migrated_pg: str, api_redis_url: str, tmp_path: Path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", database_url=migrated_pg, broker_url=api_redis_url,
                    blob_dir=tmp_path / "blobs", auth_enabled=True, max_upload_bytes=2 * 1024 * 1024,
                    secret_key=Fernet.generate_key().decode())


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """Start the real app (lifespan included) for some settings; closed at teardown."""
    clients: list[TestClient] = []

    def start(settings: Settings, **kwargs) -> TestClient:  # noqa: ANN003
        client = TestClient(create_app(settings), **kwargs)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(api_settings: Settings, make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_settings)


@pytest.fixture
def make_key(api_settings: Settings) -> Callable[[str], dict[str, str]]:
    """Create an API key in the DB; returns the Authorization header for it."""

    def create(name: str = "test") -> dict[str, str]:
        with session_scope(api_settings.effective_database_url) as session:
            _, secret = keys.create_key(session, name)
        return {"Authorization": f"Bearer {secret}"}

    return create


@pytest.fixture
def auth(make_key: Callable[[str], dict[str, str]]) -> dict[str, str]:
    return make_key("alice")


@pytest.fixture
def pdf_bytes(corpus_dir: Path) -> bytes:
    return (corpus_dir / SMALL_PDF).read_bytes()


@pytest.fixture
def other_pdf_bytes(corpus_dir: Path) -> bytes:
    return (corpus_dir / OTHER_PDF).read_bytes()


def upload(client: TestClient, headers: dict[str, str], content: bytes, name: str = "doc.pdf",
           data: dict | None = None, extra_headers: dict[str, str] | None = None):  # noqa: ANN201
    return client.post("/v1/documents", headers={**headers, **(extra_headers or {})},
                       files={"file": (name, content, "application/octet-stream")}, data=data or {})
