"""The service path end to end: the real app (TestClient) on Postgres, Celery over real Redis, and real
`longdoc worker` subprocesses for the parse and gpu queues; real corpus PDFs; the extractive engine."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from storage.db import session_scope
from storage.models import Chunk, Page, Result
from tests.fixtures_workers import (
    LONG_QA_FILE,
    ServiceSetup,
    api_client,
    create_long_qa_job,
    poll_document,
    poll_job,
    upload,
    wait_for,
)


def test_upload_parse_and_jobs_through_separate_parse_and_gpu_workers(service: ServiceSetup,
                                                                      corpus_dir: Path) -> None:
    parse_worker = service.start_worker("parse", "--concurrency", "2", ready=False)
    gpu_worker = service.start_worker("gpu", ready=False)
    parse_worker.wait_ready()
    gpu_worker.wait_ready()
    with api_client(service.settings) as client:
        h = service.headers
        contract = upload(client, h, corpus_dir / "contract-cerence-ip.pdf")
        # Jobs run on the short report: the extractive engine's CPU time is not what this test is about.
        report = upload(client, h, corpus_dir / "report-ntsb-accident-nyc08ca055.pdf", tasks="summarize")
        assert report["status"] == "uploaded" and len(report["jobs"]) == 1

        for doc in (contract, report):
            body = poll_document(client, h, doc["id"], timeout=120)
            assert body["status"] == "parsed", body
            assert body["pages"] > 0 and body["tokens"] > 0
        with session_scope(service.settings.effective_database_url) as s:
            pages = s.scalar(select(func.count()).select_from(Page).where(Page.document_id == contract["id"]))
            chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.document_id == contract["id"]))
        assert pages == 24 and chunks > 0  # MANIFEST: 24 pages

        # The job created at upload was released by the parse task to the gpu queue.
        summary = poll_job(client, h, report["jobs"][0]["id"], timeout=180)
        assert summary["status"] == "succeeded", summary
        assert summary["result"] and summary["attempts"] == 1

        # A job created on an already-parsed document goes straight to the gpu worker.
        resp = client.post(f"/v1/documents/{report['id']}/jobs", headers=h,
                           json={"task": "qa", "params": {"questions": ["Where did the accident happen?"]}})
        assert resp.status_code == 202, resp.text
        qa = poll_job(client, h, resp.json()["id"], timeout=120)
        assert qa["status"] == "succeeded", qa
        assert qa["progress"] == 1.0

        # Cancel while running: the worker notices at its next progress report (or its fenced final
        # write finds the row canceled), stops and writes nothing. The extractive backend summarizes
        # this contract in tens of milliseconds now: 20 questions on a 106-page one run long enough to
        # be caught running.
        big = upload(client, h, corpus_dir / LONG_QA_FILE)
        assert poll_document(client, h, big["id"], timeout=120)["status"] == "parsed"
        long_job = create_long_qa_job(client, h, big["id"])
        wait_for(lambda: client.get(f"/v1/jobs/{long_job}", headers=h).json()["status"] != "queued", 120, 0.02,
                 what="the qa job to start")
        assert client.get(f"/v1/jobs/{long_job}", headers=h).json()["status"] == "running"
        assert client.delete(f"/v1/jobs/{long_job}", headers=h).status_code in (200, 202, 204)
        wait_for(lambda: f"job {long_job}: aborted" in gpu_worker.log(), 60, 0.3, what="the worker to abort the job")
        canceled = client.get(f"/v1/jobs/{long_job}", headers=h).json()
        assert canceled["status"] == "canceled" and canceled["result"] is None, canceled

    # Each queue's tasks ran on its own worker process.
    assert parse_worker.ran("longdoc.parse_document") and not parse_worker.ran("longdoc.run_job")
    assert gpu_worker.ran("longdoc.run_job") and not gpu_worker.ran("longdoc.parse_document")
    assert parse_worker.alive and gpu_worker.alive
    with session_scope(service.settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 2  # summary + qa, none for the canceled job


def test_bad_files_fail_with_their_code_and_their_jobs_fail_with_them(service: ServiceSetup, corpus_dir: Path,
                                                                     tmp_path: Path) -> None:
    worker = service.start_worker("parse,gpu")
    with api_client(service.settings) as client:
        h = service.headers
        scanned = upload(client, h, corpus_dir / "hostile-scanned-no-text.pdf", tasks="summarize")
        body = poll_document(client, h, scanned["id"], timeout=120)
        assert body["status"] == "failed" and body["error"]["code"] == "no_text_layer", body
        job = poll_job(client, h, scanned["jobs"][0]["id"], timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "no_text_layer", job

        # The same worker goes on with the next document.
        ok = upload(client, h, corpus_dir / "contract-galera-joint-filing.pdf")
        assert poll_document(client, h, ok["id"], timeout=120)["status"] == "parsed"
    assert worker.alive
    with session_scope(service.settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 0
