"""A real Postgres outage (a private server, stopped and started): every route family answers 503 with
the JSON error while it is down, and 200 on its FIRST request once it is back, the job poll included
(its own connection pool must not need a request per dead connection to recover)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from config.settings import Settings
from storage import keys, migrate
from storage.db import get_engine, session_scope
from storage.models import Document, DocumentStatus
from tests.fixtures_api import upload
from tests.private_postgres import PrivatePostgres, private_postgres

pytestmark = pytest.mark.timeout(60)

OUTAGE_S = 17.0


@pytest.fixture
def outage_pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        migrate.upgrade(server.url)
        try:
            yield server
        finally:
            get_engine(server.url).dispose()


def _is_db_down(r) -> bool:  # noqa: ANN001
    return (r.status_code == 503 and r.headers["content-type"].startswith("application/json")
            and r.json()["error"]["code"] == "database_unavailable" and "retry-after" in r.headers)


def test_every_route_family_is_503_during_an_outage_and_200_on_the_first_request_after(
        outage_pg: PrivatePostgres, api_redis_url: str, tmp_path: Path, make_client: Callable[..., TestClient],
        pdf_bytes: bytes, other_pdf_bytes: bytes, corpus_dir: Path):
    started = time.monotonic()
    url = outage_pg.url
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=url, broker_url=api_redis_url,
                        blob_dir=tmp_path / "blobs", auth_enabled=True, auth_cache_s=600)
    with session_scope(url) as s:
        secrets = [keys.create_key(s, name)[1] for name in ("outage", "fresh")]
    # `auth` is verified before the outage and cached: its requests reach the routes' own queries.
    # `fresh` is first used during the outage: its key lookup is what fails, then recovers.
    auth, fresh = ({"Authorization": f"Bearer {secret}"} for secret in secrets)
    client = make_client(settings)

    first = upload(client, auth, pdf_bytes).json()["id"]
    doomed = upload(client, auth, other_pdf_bytes).json()["id"]
    with session_scope(url) as s:
        s.get(Document, uuid.UUID(first)).status = DocumentStatus.parsed
    job = client.post(f"/v1/documents/{first}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
    # Fill both pools with several connections, as load does: each one dies in the outage.
    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(lambda _: client.get(f"/v1/jobs/{job}", headers=auth).status_code, range(32)))
        warm += list(pool.map(lambda _: client.get("/v1/documents", headers=auth).status_code, range(16)))
    assert set(warm) == {200}

    third = (corpus_dir / "contract-galera-joint-filing.txt").read_bytes()
    requests: dict[str, Callable[[], object]] = {
        "upload": lambda: upload(client, auth, third, name="c.txt"),
        "job create": lambda: client.post(f"/v1/documents/{first}/jobs", headers=auth, json={"task": "summarize"}),
        "poll": lambda: client.get(f"/v1/jobs/{job}", headers=auth),
        "get document": lambda: client.get(f"/v1/documents/{first}", headers=auth),
        "list documents": lambda: client.get("/v1/documents", headers=auth),
        "list jobs": lambda: client.get("/v1/jobs", headers=auth),
        "cancel": lambda: client.delete(f"/v1/jobs/{job}", headers=auth),
        "delete": lambda: client.delete(f"/v1/documents/{doomed}", headers=auth),
        "new key": lambda: client.get("/v1/jobs", headers=fresh),
    }

    outage_pg.stop("fast")  # an operator's restart: every client connection is closed by the server
    down_since = time.monotonic()
    for name, request in requests.items():
        t0 = time.monotonic()
        r = request()
        assert _is_db_down(r), (name, r.status_code, r.text)
        assert time.monotonic() - t0 < 1.0, (name, "a refused connection is known at once")
    # An outage of OUTAGE_S: long enough for a pool that reconnects in the background with exponential
    # backoff (psycopg_pool: 1, 2, 4, 8 s...) to be asleep when the server is back. Polls keep coming.
    while time.monotonic() - down_since < OUTAGE_S:
        assert _is_db_down(requests["poll"]())
        time.sleep(0.3)

    outage_pg.start()
    expected = {"upload": 201, "job create": 202, "poll": 200, "get document": 200, "list documents": 200,
                "list jobs": 200, "cancel": 200, "delete": 204, "new key": 200}
    # The poll first, then the rest, each on its first request after the restart.
    for name in ["poll", *[n for n in requests if n != "poll"]]:
        r = requests[name]()
        assert r.status_code == expected[name], (name, r.status_code, r.text)
    # Every pooled connection of the poll died: concurrent polls must all find live ones at once.
    with ThreadPoolExecutor(8) as pool:
        polls = list(pool.map(lambda _: client.get(f"/v1/jobs/{job}", headers=auth), range(16)))
    assert [p.status_code for p in polls] == [200] * 16, [p.text for p in polls if p.status_code != 200]
    assert polls[0].json()["status"] == "canceled"
    assert client.get(f"/v1/documents/{doomed}", headers=auth).status_code == 404
    assert time.monotonic() - started < 40
