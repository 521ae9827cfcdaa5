"""Chaos over a batch (issue 12): 30 corpus documents with 3 jobs each (summarize, qa, classify) go in
through a real `longdoc serve` while parse and gpu worker processes are SIGKILLed at random (and
restarted) and the private Redis is restarted once without persistence, losing every message.
Afterwards the database alone says the service recovered: every document is parsed or failed with a
code, every job has exactly one result or a coded failure, nothing is left running or parsing.

Recovery comes from the database side only: leases of 5 s, a reaper tick every second and a
reconcile grace of 4 s (LONGDOC_* settings) re-queue what a dead worker held and re-send what the
restarted Redis lost, so the whole test runs in 55-90 s on a loaded 2-core box.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from storage.db import session_scope
from storage.models import Chunk, Document, DocumentStatus, Job, JobStatus, Page, Result
from tests.corpus_expectations import EXPECTED
from tests.fixtures_workers import (
    REPO_ROOT,
    ServiceSetup,
    WorkerProcess,
    free_port,
    running_service,
    serve_process,
    wait_for,
)
from tests.private_redis import PrivateRedis, private_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
log = logging.getLogger(__name__)

# Small and mixed: contracts, reports, papers, forms, other scripts, hostile files (an encrypted PDF,
# an image-only scan, malformed xref tables, a corrupted stream) and the plain-text CUAD contracts.
DOCUMENTS = (
    "contract-galera-joint-filing.pdf", "contract-ivillage-sponsorship.pdf", "contract-cybergy-affiliate.pdf",
    "contract-cerence-ip.pdf", "report-ntsb-accident-nyc08ca055.pdf", "report-dhs-strategic-plan-2020.pdf",
    "report-gsa-strategic-plan-2022.pdf", "report-aapl-10q-2022q3.pdf", "report-federal-register-2020-17221.pdf",
    "paper-semantic-scholar-naacl2018.pdf", "paper-mapreduce-osdi04.pdf", "paper-two-column-reading-order.pdf",
    "paper-layoutparser-empty-pages.pdf", "form-sf424-page2.pdf", "form-pdflatex-fields.pdf",
    "form-pdffill-demo.pdf", "other-korean-tables.pdf", "other-latex-multicolumn.pdf", "other-arabic-rotated.pdf",
    "hostile-encrypted-aes256-userpw.pdf", "hostile-scanned-no-text.pdf", "hostile-xref-loop.pdf",
    "hostile-no-startxref.pdf", "hostile-corrupted-zen.pdf", "hostile-copy-protected-ownerpw.pdf",
    "contract-galera-joint-filing.txt", "contract-ivillage-sponsorship.txt", "contract-cybergy-affiliate.txt",
    "contract-cerence-ip.txt", "contract-energous-strategic-alliance.txt",
)
TASKS = "summarize,qa,classify"
SEED = 12  # the victims' order; the timing is the box's
CHAOS_S = 35.0  # kills go on this long after the uploads
REDIS_DOWN_AT_S = 12.0  # into the chaos window
SETTLE_S = 150.0  # after the chaos, everything must be terminal within this
RECOVERY = {"job_lease_s": 5, "reaper_interval_s": 1.0, "reconcile_grace_s": 4.0, "max_attempts": 5}


@pytest.fixture
def chaos_service(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServiceSetup, PrivateRedis]]:
    with private_redis() as broker, running_service(pg_url, broker.url, tmp_path, parse_timeout_s=60.0,
                                                    gpu_documents_in_flight=2, **RECOVERY) as setup:
        yield setup, broker


def _upload(client: httpx.Client, headers: dict[str, str], path: Path) -> httpx.Response:
    with path.open("rb") as f:
        return client.post("/v1/documents", headers=headers, files={"file": (path.name, f, "application/octet-stream")},
                           data={"tasks": TASKS, "question": "Who are the parties and what do they agree to?"})


def _upload_all(client: httpx.Client, headers: dict[str, str], corpus_dir: Path) -> tuple[dict[str, str], list[str]]:
    doc_ids: dict[str, str] = {}
    job_ids: list[str] = []
    for name in DOCUMENTS:
        resp = _upload(client, headers, corpus_dir / name)
        assert resp.status_code == 201, (name, resp.text)
        body = resp.json()
        assert sorted(j["task"] for j in body["jobs"]) == ["classify", "qa", "summarize"], body
        doc_ids[name] = body["id"]
        job_ids += [j["id"] for j in body["jobs"]]
    return doc_ids, job_ids


def _parsing(url: str) -> bool:
    with session_scope(url) as s:
        return bool(s.scalar(select(func.count()).select_from(Document).where(
            Document.status == DocumentStatus.parsing)))


def _unfinished(url: str) -> tuple[int, int]:
    with session_scope(url) as s:
        docs = s.scalar(select(func.count()).select_from(Document).where(
            Document.status.in_([DocumentStatus.uploaded, DocumentStatus.parsing])))
        jobs = s.scalar(select(func.count()).select_from(Job).where(
            Job.status.in_([JobStatus.queued, JobStatus.running])))
    return docs, jobs


def _broker_messages(broker: PrivateRedis) -> int:
    """Messages in the broker: waiting in the parse/gpu queues or delivered and not yet acknowledged."""
    import redis

    client = redis.Redis.from_url(broker.url)
    try:
        return sum(client.llen(q) for q in ("parse", "gpu")) + client.hlen("unacked")
    finally:
        client.close()


def _holders(url: str) -> set[str]:
    """pids of the processes holding a running job (worker_id is host:pid:thread)."""
    with session_scope(url) as s:
        ids = s.scalars(select(Job.worker_id).where(Job.status == JobStatus.running)).all()
    return {w.split(":")[1] for w in ids if w and w.count(":") >= 2}


def test_a_batch_survives_random_worker_kills_and_a_redis_restart(
        chaos_service: tuple[ServiceSetup, PrivateRedis], corpus_dir: Path) -> None:
    service, broker = chaos_service
    url = service.settings.effective_database_url
    started = time.monotonic()
    # Every worker is a victim, restarted at once after its kill as a supervisor would; the parse
    # worker also runs the deployment's one beat (reaper + reconciler), so recovery itself is killed too.
    roles = {"parse": ("parse", "--beat", "--concurrency", "2"), "gpu-a": ("gpu",), "gpu-b": ("gpu",)}
    victims: dict[str, WorkerProcess] = {role: service.start_worker(*args, ready=False) for role, args in roles.items()}
    for worker in victims.values():
        worker.wait_ready()
    kills: list[str] = []

    def kill(role: str) -> None:
        victims[role].kill()
        kills.append(role)
        victims[role] = service.start_worker(*roles[role], ready=False)

    def busy_gpu_worker() -> str | None:
        holders = _holders(url)
        return next((r for r, w in victims.items() if r != "parse" and str(w.proc.pid) in holders), None)

    port = free_port()
    with serve_process(service.env(api_port=port), REPO_ROOT, service.tmp / "serve.log", port) as (_server, base), \
            httpx.Client(base_url=base, timeout=30) as client, ThreadPoolExecutor(1) as uploader:
        h = service.headers
        # The empty file is refused before storage (400 empty_file): it never becomes a document.
        refused = _upload(client, h, corpus_dir / "hostile-empty-0-bytes.pdf")
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "empty_file"), refused.text
        uploads = uploader.submit(_upload_all, client, h, corpus_dir)
        # The first victims are chosen so that both kinds of recovery must happen: the parse worker
        # caught parsing (only it consumes the parse queue), then a gpu worker caught computing.
        for _ in range(3):  # a parse can end between the look and the kill: then the next one is the target
            wait_for(lambda: _parsing(url), 60, 0.05, what="a document being parsed")
            kill("parse")
            if _parsing(url):  # the dead worker's claim is left behind for the lease to recover
                break
        doc_ids, job_ids = uploads.result()
        uploaded_at = time.monotonic()
        kill(wait_for(busy_gpu_worker, 90, 0.1, what="a gpu worker to be running a job"))
        rng = random.Random(SEED)
        redis_restarted = False
        while time.monotonic() - uploaded_at < CHAOS_S:
            time.sleep(rng.uniform(2.0, 4.5))
            kill(rng.choice(sorted(victims)))
            if not redis_restarted and time.monotonic() - uploaded_at > REDIS_DOWN_AT_S:
                in_flight = _broker_messages(broker)
                broker.stop()  # no persistence: queued and unacknowledged messages are all gone
                time.sleep(1.0)
                broker.start()
                assert in_flight > 0 and _broker_messages(broker) == 0, in_flight  # the restart lost them
                redis_restarted = True
        assert redis_restarted and len(kills) >= 6, kills
        chaos_end = time.monotonic()

        def settled() -> bool:
            return _unfinished(url) == (0, 0)

        wait_for(settled, SETTLE_S, 0.5, what="every document and job to finish")
        settled_at = time.monotonic()
        # The API's view of every job agrees: terminal, and a result exactly where it succeeded.
        for job_id in job_ids:
            job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
            assert job["status"] in ("succeeded", "failed"), job
            assert bool(job["result"]) == (job["status"] == "succeeded"), job
            assert (job["error"] is None) == (job["status"] == "succeeded"), job

    log.info("chaos: %d uploads in %.1f s, %d kills (%s) over %.1f s, settled %.1f s later; total %.1f s",
             len(doc_ids), uploaded_at - started, len(kills), ",".join(kills), chaos_end - uploaded_at,
             settled_at - chaos_end, time.monotonic() - started)
    assert all(w.alive for w in victims.values()), "a restarted worker died on its own"
    _check_final_state(url, doc_ids)


def _check_final_state(url: str, doc_ids: dict[str, str]) -> None:
    problems: list[str] = []
    reparsed = rerun = 0
    with session_scope(url) as s:
        docs = {str(d.id): d for d in s.scalars(select(Document))}
        assert set(docs) == set(doc_ids.values()), "one document per upload, no more"
        results = dict(s.execute(select(Result.job_id, func.count()).group_by(Result.job_id)).all())
        jobs = list(s.scalars(select(Job)))
        assert len(jobs) == 3 * len(doc_ids)
        for name, doc_id in doc_ids.items():
            doc, expected = docs[doc_id], EXPECTED[name]
            got = (str(doc.status), doc.error_code)
            if got != (expected.status, expected.code) and got != ("failed", "worker_lost"):
                problems.append(f"{name}: {got} ({doc.error_message}), expected {(expected.status, expected.code)}")
            if doc.status == DocumentStatus.parsed:
                pages = s.scalar(select(func.count()).select_from(Page).where(Page.document_id == doc.id))
                chunks = s.scalars(select(Chunk.index).where(Chunk.document_id == doc.id)).all()
                if pages != doc.pages or sorted(chunks) != list(range(len(chunks))) or not chunks:
                    problems.append(f"{name}: {pages} page rows for {doc.pages} pages, chunks {sorted(chunks)[:5]}...")
            if doc.lease_until is not None:
                problems.append(f"{name}: {doc.status} and still holds a lease")
            reparsed += doc.parse_attempts > 1
        for job in jobs:
            doc = docs[str(job.document_id)]
            what = f"{job.task} job {job.id} of {doc.filename}"
            count = results.get(job.id, 0)
            rerun += job.attempts > 1
            if job.status == JobStatus.succeeded:
                if count != 1:
                    problems.append(f"{what}: succeeded with {count} results")
            elif job.status == JobStatus.failed:
                # a job fails only with its document's error or after max_attempts lost leases
                if count != 0 or job.error_code not in {doc.error_code, "worker_lost"} or not job.error_code:
                    problems.append(f"{what}: failed {job.error_code} ({job.error_message}) with {count} results")
                if doc.status == DocumentStatus.parsed and job.error_code != "worker_lost":
                    problems.append(f"{what}: failed {job.error_code} on a parsed document")
            else:
                problems.append(f"{what}: left {job.status}")
            if job.lease_until is not None:
                problems.append(f"{what}: still holds a lease")
        succeeded = sum(j.status == JobStatus.succeeded for j in jobs)
    assert not problems, "\n".join(problems)
    log.info("chaos: %d documents re-parsed and %d jobs re-run after a kill, %d/%d jobs succeeded",
             reparsed, rerun, succeeded, len(jobs))
    assert rerun >= 1 and reparsed >= 1, "a kill meant to hit a running job or parse hit nothing"
    assert succeeded >= 60, f"only {succeeded} of {len(jobs)} jobs succeeded"
