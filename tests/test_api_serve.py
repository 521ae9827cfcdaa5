"""The serving side of the API: the poll's hand-built JSON against JobPublic, recovery from killed DB
connections, and `longdoc serve --workers N` (refused in embedded mode, real
worker processes in service mode)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from sqlalchemy import create_engine, text

from api.schemas import JobPublic, job_public_json
from config.settings import Settings, get_settings
from longdoc.cli import main as longdoc_main
from storage import jobs as repo
from storage import keys, migrate
from storage.db import session_scope
from storage.hot_reads import HotReads
from storage.models import Document, DocumentStatus, Job, JobStatus, Result, utcnow
from tests.fixtures_workers import free_port, serve_process, settings_env

REPO_ROOT = Path(__file__).resolve().parents[1]


def _add_jobs(url: str, owner_id: uuid.UUID | None) -> list[uuid.UUID]:
    """One job per shape a poll can show: queued, running, succeeded with a result, failed with an error,
    canceled; timestamps with and without microseconds."""
    now = utcnow().replace(microsecond=123456)
    with session_scope(url) as s:
        doc = Document(owner_id=owner_id, filename="a.pdf", sha256="ab" * 32, bytes=10, media_type="application/pdf",
                       status=DocumentStatus.parsed, pages=3, tokens=900)
        s.add(doc)
        s.flush()
        jobs = [
            Job(document_id=doc.id, owner_id=owner_id, task="summarize", params={}, status=JobStatus.queued),
            Job(document_id=doc.id, owner_id=owner_id, task="qa", params={"questions": ["Who?", "When?"]},
                status=JobStatus.running, progress=0.25, stage="prefill", attempts=1, started_at=now),
            Job(document_id=doc.id, owner_id=owner_id, task="classify", params={"labels": ["nda"], "multi_label": True},
                status=JobStatus.succeeded, progress=1.0, stage="done", attempts=2, started_at=now,
                finished_at=now.replace(microsecond=0) + timedelta(seconds=3)),
            Job(document_id=doc.id, owner_id=owner_id, task="summarize", params={"max_words": 50},
                status=JobStatus.failed, error_code="context_too_long", error_message="über 65,536 tokens",
                attempts=3, finished_at=now),
            Job(document_id=doc.id, owner_id=owner_id, task="qa", params={"questions": ["x"]}, status=JobStatus.canceled,
                finished_at=now),
        ]
        s.add_all(jobs)
        s.flush()
        s.add(Result(job_id=jobs[2].id, payload={"labels": [{"label": "nda", "score": 0.93, "citations": [{"page": 2}]}]}))
        # A result row on a job that is not succeeded (a re-run in flight) must not be shown.
        s.add(Result(job_id=jobs[1].id, payload={"answers": []}))
        return [j.id for j in jobs]


def _expected(url: str, job_id: uuid.UUID) -> dict:
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        return JobPublic.of(job, job.result.payload if job.result else None).model_dump(mode="json")


def test_poll_body_is_exactly_jobpublic_on_postgres(client, api_settings, make_key):
    header = make_key("poller")
    with session_scope(api_settings.effective_database_url) as s:
        owner = keys.authenticate(s, header["Authorization"].removeprefix("Bearer ")).id
    url = api_settings.effective_database_url
    for job_id in _add_jobs(url, owner):
        r = client.get(f"/v1/jobs/{job_id}", headers=header)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == _expected(url, job_id)
        assert ("retry-after" in r.headers) == (r.json()["status"] in ("queued", "running"))
    assert client.get(f"/v1/jobs/{uuid.uuid4()}", headers=header).json()["error"]["code"] == "not_found"


def test_poll_body_is_exactly_jobpublic_on_sqlite(tmp_path: Path):
    """The embedded store returns naive datetimes and hex UUIDs through SQLAlchemy's types: same JSON."""
    url = f"sqlite:///{tmp_path / 'poll.db'}"
    migrate.upgrade(url)
    for job_id in _add_jobs(url, None):
        row = asyncio.run(repo.get_job_view(HotReads(url), None, job_id))
        body = orjson.loads(job_public_json(row))
        assert body == _expected(url, job_id)
        assert body["created_at"].endswith("Z") and body["updated_at"].endswith("Z")  # UTC, never naive


def _terminate_app_connections(db_url: str) -> int:
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        killed = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar_one()
    admin.dispose()
    return killed


def test_killed_db_connections_cost_at_most_one_503_and_polls_none(client, api_settings, auth, pdf_bytes):
    """What a Postgres restart does to the pools: every pooled connection dies. Sessions' pool pings
    on checkout (at worst one 503 if a ping-less path meets it first); the poll's own pool has no ping
    and must retry on a fresh connection, never answering 503 for it."""
    from tests.fixtures_api import upload

    doc_id = upload(client, auth, pdf_bytes).json()["id"]
    with session_scope(api_settings.effective_database_url) as s:
        s.get(Document, uuid.UUID(doc_id)).status = DocumentStatus.parsed
    job_id = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
    url = api_settings.effective_database_url
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200  # pooled connections exist

    assert _terminate_app_connections(url) >= 1
    statuses = [client.get(f"/v1/documents/{doc_id}", headers=auth).status_code for _ in range(3)]
    assert statuses.count(503) <= 1 and statuses[-2:] == [200, 200], statuses

    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert _terminate_app_connections(url) >= 1
    polls = [client.get(f"/v1/jobs/{job_id}", headers=auth) for _ in range(3)]
    assert [p.status_code for p in polls] == [200, 200, 200], [p.text for p in polls]
    assert polls[0].json()["status"] == "queued"


@pytest.mark.parametrize("how", [["--workers", "2"], []])
def test_serve_refuses_several_workers_in_embedded_mode(tmp_path, monkeypatch, capsys, how):
    monkeypatch.setenv("LONGDOC_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("LONGDOC_BROKER_URL", raising=False)
    monkeypatch.delenv("LONGDOC_DATABASE_URL", raising=False)
    if not how:
        monkeypatch.setenv("LONGDOC_API_WORKERS", "2")
    get_settings.cache_clear()
    try:
        assert longdoc_main(["serve", *how]) == 2
    finally:
        get_settings.cache_clear()
    assert "needs service mode" in capsys.readouterr().err
    assert not (tmp_path / "longdoc.db").exists()  # refused before anything was created


def test_serve_with_two_workers_serves_polls_from_two_processes(migrated_pg, api_redis_url, tmp_path):
    port = free_port()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=migrated_pg,
                        broker_url=api_redis_url, api_port=port, api_workers=2)
    with session_scope(migrated_pg) as s:
        key, secret = keys.create_key(s, "workers")
        owner = key.id
    job_ids = _add_jobs(migrated_pg, owner)
    log_path = tmp_path / "serve.log"
    with serve_process(settings_env(settings), REPO_ROOT, log_path, port, "longdoc serve --workers 2") as (server, base):
        workers = [p for p in psutil.Process(server.pid).children()
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in psutil.Process(server.pid).children()]
        # 16 keep-alive connections, opened together: SO_REUSEPORT spreads them over both processes
        # (all 16 on one would happen by chance once in 2**15 runs).
        clients = [httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=10)
                   for _ in range(16)]
        try:
            for i, http in enumerate(clients):
                job_id = job_ids[i % len(job_ids)]
                assert http.get(f"/v1/jobs/{job_id}").json() == _expected(migrated_pg, job_id)
            held = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in w.net_connections())
                    for w in workers]
            assert sum(held) == 16 and min(held) >= 1, held
        finally:
            for http in clients:
                http.close()
    assert server.returncode == 0
    assert log_path.read_text().count("Application startup complete") == 2
