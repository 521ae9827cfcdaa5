"""The gpu body: all queued jobs of one document, run together.

A job message names one job (the parse body sends one per document); the body claims that job and
every other queued job of the same document, each with its own conditional UPDATE (its own attempt = fencing token, lease, heartbeat
and progress), loads the document text once and runs the tasks concurrently, so their engine
requests arrive together: the serving engine prefills the document once and decodes the tasks in
one batch. The siblings' own messages then find nothing to claim and are no-ops. Each job ends on
its own: a task that fails fails its job with {code, message} and leaves the others running.
Several documents are in flight per process (the gpu pool has settings.gpu_documents_in_flight
threads), feeding the one engine's continuous batch.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from config.settings import Settings
from pipeline.types import DocumentText
from storage import document_text, jobs
from storage.db import session_scope
from storage.models import Document, DocumentStatus, Job, JobStatus
from workers.failures import TRANSIENT_ERRORS, JobAborted
from workers.lease import Lease, LeasedRow, as_uuid, give_back, run_leased, with_session, worker_id

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 1.0

_engines: dict[tuple[str, str, str, str], Any] = {}
_engine_lock = threading.Lock()


def task_engine(settings: Settings) -> Any:
    """The process-wide engine, loaded on first use (once per worker process)."""
    from pipeline.tasks import load_engine

    key = (settings.engine, settings.model, settings.device, settings.embedding_model)
    with _engine_lock:
        if key not in _engines:
            t0 = time.monotonic()
            _engines[key] = load_engine(settings.engine, model=settings.model, device=settings.device,
                                        embedding_model=settings.embedding_model,
                                        mpt_options=mpt_options(settings))
            log.info("engine %s loaded in %.1f s", settings.engine, time.monotonic() - t0)
        return _engines[key]


def mpt_options(settings: Settings) -> dict[str, Any]:
    """The serving engine's settings, as the MPT loader takes them."""
    from pipeline.tasks.mpt.engine import ServingOptions

    return {"prompt_family": settings.prompt_family, "options": ServingOptions(
        max_seq_len=settings.max_seq_len, block_size=settings.kv_block_size, kv_cache_gb=settings.kv_cache_gb,
        kv_reserve_gb=settings.kv_reserve_gb, max_num_seqs=settings.engine_max_seqs,
        step_tokens=settings.engine_step_tokens, prefill_chunk=settings.engine_prefill_chunk,
        warmup=settings.engine_warmup)}


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    task: str
    params: dict[str, Any]
    attempt: int


def run_job(settings: Settings, job_id: uuid.UUID | str) -> str:
    """Run `job_id` and its document's other queued jobs. Returns the status of `job_id` itself."""
    job_id = as_uuid(job_id)
    url = settings.effective_database_url
    with session_scope(url) as s:
        row = s.execute(select(Job.status, Job.document_id, Document.status, Document.error_code,
                               Document.error_message)
                        .join(Document, Document.id == Job.document_id).where(Job.id == job_id)).first()
        if row is None:
            return "missing"
        job_status, document_id, doc_status, doc_code, doc_message = row
        if doc_status == DocumentStatus.failed:
            if job_status == JobStatus.queued:
                jobs.fail_job(s, job_id, None, doc_code or "parse_error", f"document failed to parse: {doc_message}")
                return str(JobStatus.failed)
            return str(job_status)
        if doc_status != DocumentStatus.parsed:
            return "waiting"  # the parse task releases it
    # Even when `job_id` itself is no longer queued (canceled, or run by a sibling's body), its
    # document's other queued jobs are claimed here: the message stands for the whole document.
    claims = _claim_document_jobs(settings, document_id, first=job_id)
    if not claims:
        return str(job_status) if job_status != JobStatus.queued else "not_claimed"
    log.info("document %s: running %d job(s): %s", document_id, len(claims),
             ", ".join(f"{c.task} {c.job_id} #{c.attempt}" for c in claims))
    try:
        with session_scope(url) as s:
            doc_text = document_text.load_document_text(s, document_id)
    except TRANSIENT_ERRORS:
        for c in claims:
            give_back(url, lambda s, c=c: jobs.requeue_job(s, c.job_id, c.attempt), f"job {c.job_id}")
        raise
    with ThreadPoolExecutor(len(claims), thread_name_prefix="longdoc-task") as pool:
        futures = {c.job_id: pool.submit(_run_claimed, settings, c, doc_text) for c in claims}
    outcomes = {jid: f.result() for jid, f in futures.items()}  # TRANSIENT_ERRORS re-raise here: retried
    return outcomes.get(job_id, str(job_status))


def _claim_document_jobs(settings: Settings, document_id: uuid.UUID, *, first: uuid.UUID) -> list[Claim]:
    """Claim `first` and every other queued job of the document (each claim is its own UPDATE). A job
    whose result is already stored (a crash after the result commit) is completed without running."""
    claims: list[Claim] = []
    with session_scope(settings.effective_database_url) as s:
        ids = jobs.queued_job_ids(s, document_id)
        ordered = [first, *[i for i in ids if i != first]] if first in ids else ids
        for jid in ordered:
            attempt = jobs.claim_job(s, jid, worker_id(), settings.job_lease_s)
            if attempt is None:
                continue
            if jobs.has_result(s, jid):
                jobs.complete_job(s, jid, attempt, None)
                continue
            task, params = s.execute(select(Job.task, Job.params).where(Job.id == jid)).one()
            claims.append(Claim(jid, str(task), dict(params or {}), attempt))
    return claims


def _run_claimed(settings: Settings, claim: Claim, doc_text: DocumentText) -> str:
    """One claimed job: lease + heartbeat, the task, the fenced final write."""
    url, lease_s = settings.effective_database_url, settings.job_lease_s
    job_id, attempt = claim.job_id, claim.attempt
    row = LeasedRow(
        f"job {job_id}", url, lease_s,
        extend=lambda s: jobs.heartbeat_job(s, job_id, attempt, lease_s),
        give_back=lambda s: jobs.requeue_job(s, job_id, attempt),
        fail=lambda code, message: _finish_failed_job(url, job_id, attempt, code, message),
        lost="aborted")

    def work(lease: Lease) -> dict[str, Any]:
        progress = _progress_writer(url, job_id, attempt, lease_s, lease)
        progress(0.0, "loading engine")
        engine = task_engine(settings)
        from pipeline.tasks import run_task

        return run_task(engine, claim.task, claim.params, doc_text, progress)

    def succeeded(_payload: dict[str, Any]) -> str:
        log.info("job %s: succeeded", job_id)
        return str(JobStatus.succeeded)

    return run_leased(row, work, lambda s, payload: jobs.complete_job(s, job_id, attempt, payload), succeeded)


def _progress_writer(url: str, job_id: uuid.UUID, attempt: int, lease_s: float,
                     lease: Lease) -> Callable[[float, str], None]:
    """The run_task progress callback: records progress at most once a second and stops a lost job."""
    last_write = 0.0

    def progress(fraction: float, stage: str) -> None:
        nonlocal last_write
        if lease.lost.is_set():
            raise JobAborted(str(job_id))
        now = time.monotonic()
        if now - last_write < PROGRESS_WRITE_INTERVAL_S and fraction < 1.0:
            return
        last_write = now
        if not with_session(url, lambda s: jobs.heartbeat_job(s, job_id, attempt, lease_s, fraction, stage)):
            lease.lost.set()
            raise JobAborted(str(job_id))

    return progress


def _finish_failed_job(url: str, job_id: uuid.UUID, attempt: int, code: str, message: str) -> str:
    log.info("job %s failed: %s: %s", job_id, code, message)
    with session_scope(url) as s:
        return str(JobStatus.failed) if jobs.fail_job(s, job_id, attempt, code, message) else "aborted"
