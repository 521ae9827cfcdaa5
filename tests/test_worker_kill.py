"""A worker SIGKILLed mid-task (the whole process group: worker, pool, parse child, as a lost machine)
leaves a claimed row whose lease expires; a new worker's reaper re-queues it and the work completes
once, with one set of pages and one result. Leases are 3 s and the reaper ticks every second here
(FAST_RECOVERY); production defaults are minutes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.db import session_scope
from storage.models import Chunk, Document, Job, Page, Result
from tests.fixtures_workers import ServiceSetup, api_client, poll_document, poll_job, upload, wait_for

pytestmark = pytest.mark.slow


def _row(service: ServiceSetup, model: type, row_id: str):  # noqa: ANN202
    with session_scope(service.settings.effective_database_url) as s:
        return s.get(model, row_id)


def test_worker_killed_while_parsing_the_400_page_document(service: ServiceSetup, corpus_dir: Path) -> None:
    # pypdf is ~10x slower than PDFium: it keeps the first worker busy long enough to be killed mid-parse.
    doomed = service.start_worker("parse", "--concurrency", "1", pdf_extractor="pypdf")
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / "hostile-irs-irm-400pages.pdf", tasks="summarize")
        wait_for(lambda: _row(service, Document, doc["id"]).status == "parsing", 60, 0.05,
                 what="the first worker to claim the document")
        doomed.kill()
        lost = _row(service, Document, doc["id"])
        assert (lost.status, lost.parse_attempts) == ("parsing", 1)  # killed mid-parse, nothing stored

        service.start_worker("parse,gpu", "--beat")
        body = poll_document(client, h, doc["id"], timeout=150)
        assert body["status"] == "parsed", body
        assert body["pages"] == 400
        job = poll_job(client, h, doc["jobs"][0]["id"], timeout=240)
        assert job["status"] == "succeeded", job

    with session_scope(service.settings.effective_database_url) as s:
        parsed = s.get(Document, doc["id"])
        assert parsed.parse_attempts == 2
        assert s.scalar(select(func.count()).select_from(Page).where(Page.document_id == parsed.id)) == 400
        chunk_indexes = s.scalars(select(Chunk.index).where(Chunk.document_id == parsed.id)).all()
        assert sorted(chunk_indexes) == list(range(len(chunk_indexes)))  # one set of chunks, no duplicates
        assert s.scalar(select(func.count()).select_from(Result)) == 1


def test_worker_killed_while_running_a_job(service: ServiceSetup, corpus_dir: Path) -> None:
    parser = service.start_worker("parse")
    doomed = service.start_worker("gpu")
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / "contract-bonton-agency.pdf")
        assert poll_document(client, h, doc["id"], timeout=120)["status"] == "parsed"
        resp = client.post(f"/v1/documents/{doc['id']}/jobs", headers=h, json={"task": "summarize", "params": {}})
        job_id = resp.json()["id"]
        wait_for(lambda: _row(service, Job, job_id).status == "running", 60, 0.05,
                 what="the gpu worker to claim the job")
        doomed.kill()
        lost = _row(service, Job, job_id)
        assert (lost.status, lost.attempts) == ("running", 1)

        parser.stop()
        service.start_worker("gpu", "--beat")
        job = poll_job(client, h, job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2 and job["result"]

    with session_scope(service.settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 1


def test_a_job_whose_worker_keeps_dying_fails_worker_lost(service: ServiceSetup, corpus_dir: Path) -> None:
    """After settings.max_attempts lost leases the reaper gives up with a clear error instead of looping."""
    worker = service.start_worker("parse,gpu", max_attempts=1)
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / "contract-galera-joint-filing.pdf")
        assert poll_document(client, h, doc["id"], timeout=120)["status"] == "parsed"
        worker.stop()
        job_id = client.post(f"/v1/documents/{doc['id']}/jobs", headers=h,
                             json={"task": "summarize", "params": {}}).json()["id"]
        doomed = service.start_worker("gpu", max_attempts=1)
        wait_for(lambda: _row(service, Job, job_id).status == "running", 60, 0.05, what="the job to be claimed")
        doomed.kill()
        service.start_worker("parse", "--beat", max_attempts=1)
        job = poll_job(client, h, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    assert job["attempts"] == 1
