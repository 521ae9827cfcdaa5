"""Embedded mode: no broker, SQLite under the data dir, the same task bodies in an in-process thread
pool; the real app behind a TestClient, real corpus PDFs, the extractive engine."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from config.settings import Settings
from storage.blobs import BlobStore
from storage.db import session_scope
from storage.models import Document, DocumentStatus, Job, JobStatus, Result, utcnow
from tests.fixtures_workers import (
    api_client,
    free_port,
    make_api_key,
    poll_document,
    poll_job,
    serve_process,
    settings_env,
    upload,
    wait_for,
)
from workers.embedded import get_runner
from workers.transport import get_dispatcher


def test_upload_parse_and_jobs_run_in_process(embedded_settings: Settings, corpus_dir: Path) -> None:
    h = {"Authorization": f"Bearer {make_api_key(embedded_settings)}"}
    assert get_dispatcher(embedded_settings).broker_ok()
    with api_client(embedded_settings) as client:
        doc = upload(client, h, corpus_dir / "contract-galera-joint-filing.pdf", tasks="summarize,qa",
                     question="Who are the parties to the agreement?")
        assert len(doc["jobs"]) == 2
        body = poll_document(client, h, doc["id"], timeout=120)
        assert body["status"] == "parsed" and body["pages"] == 3, body
        for job in doc["jobs"]:
            done = poll_job(client, h, job["id"], timeout=180)
            assert done["status"] == "succeeded" and done["result"], done

        failed = upload(client, h, corpus_dir / "hostile-encrypted-aes256-userpw.pdf", tasks="summarize")
        body = poll_document(client, h, failed["id"], timeout=60)
        assert body["status"] == "failed" and body["error"]["code"] == "password_required", body
        assert poll_job(client, h, failed["jobs"][0]["id"], timeout=30)["error"]["code"] == "password_required"
        # The password again, with the file: embedded mode keeps it under its own key file until the
        # parse, and the job that failed for the lack of it runs.
        upload(client, h, corpus_dir / "hostile-encrypted-aes256-userpw.pdf", password="password")
        assert poll_document(client, h, failed["id"], timeout=60)["status"] == "parsed"
        assert poll_job(client, h, failed["jobs"][0]["id"], timeout=120)["status"] == "succeeded"
        assert (embedded_settings.data_dir / "secret.key").is_file()
    assert get_dispatcher(embedded_settings).queue_depths() == {"parse": 0, "gpu": 0}


def test_in_process_reaper_recovers_work_of_a_crashed_process(embedded_settings: Settings,
                                                             corpus_dir: Path) -> None:
    """Rows left mid-flight by a process that died (claimed, lease expired) are finished by the next one."""
    url = embedded_settings.effective_database_url
    blobs = BlobStore(embedded_settings.effective_blob_dir)
    with (corpus_dir / "contract-ivillage-sponsorship.pdf").open("rb") as f:
        sha256, size, _path = blobs.put_stream(f, 10**8)
    expired = utcnow() - timedelta(seconds=60)
    with session_scope(url) as s:
        doc = Document(filename="ivillage.pdf", sha256=sha256, bytes=size, status=DocumentStatus.parsing,
                       parse_attempts=1, lease_until=expired)
        s.add(doc)
        s.flush()
        job = Job(document_id=doc.id, task="summarize", params={})
        s.add(job)
        s.flush()
        doc_id, job_id = doc.id, job.id

    get_runner(embedded_settings).start_reaper()
    wait_for(lambda: _status(url, Job, job_id) in ("succeeded", "failed"), 180, 0.3, what="recovered job")
    with session_scope(url) as s:
        doc, job = s.get(Document, doc_id), s.get(Job, job_id)
        assert (doc.status, doc.parse_attempts, doc.pages) == ("parsed", 2, 5)
        assert (job.status, job.attempts) == (JobStatus.succeeded, 1)
        assert s.scalar(select(func.count()).select_from(Result)) == 1


def _status(url: str, model: type, row_id: object) -> str:
    with session_scope(url) as s:
        return str(s.get(model, row_id).status)


def test_longdoc_serve_runs_embedded_with_nothing_else_started(tmp_path: Path, corpus_dir: Path) -> None:
    """The README's embedded path as a user runs it: `longdoc db upgrade` + `keys create`, then `longdoc serve` (a real
    uvicorn process with its in-process workers) on SQLite; upload over HTTP until parsed."""
    import subprocess
    import sys

    import httpx

    port = free_port()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", api_port=port, engine="extractive")
    env = settings_env(settings)
    cli = [sys.executable, "-m", "longdoc.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)
    secret = subprocess.run([*cli, "keys", "create", "me"], env=env, cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    log_path = tmp_path / "serve.log"
    with serve_process(env, tmp_path, log_path, port) as (server, base):
        h = {"Authorization": f"Bearer {secret}"}
        doc = upload(httpx.Client(base_url=base, timeout=30), h, corpus_dir / "contract-galera-joint-filing.pdf")
        body = poll_document(httpx.Client(base_url=base, timeout=30), h, doc["id"], timeout=60)
        assert body["status"] == "parsed" and body["pages"] == 3, body
    assert server.returncode in (0, -15) and "Application shutdown complete" in log_path.read_text()
