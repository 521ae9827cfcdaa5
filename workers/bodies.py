"""The parse body and what every body shares (the job body is workers/document_jobs.py); used by the
Celery tasks (workers.tasks) and the embedded thread pools.

Each body takes ids, claims its row with a conditional UPDATE, holds a lease kept alive by a heartbeat
thread while it works, and writes its outcome fenced by the attempt number it claimed, so running a
body twice (broker redelivery, reaper re-queue, duplicate message) changes nothing the second time.
PipelineError -> failed {code, message}; TRANSIENT_ERRORS propagate for a retry with backoff (after
handing the claim back); anything else is a bug and fails the row with `internal_error`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.exceptions
import sqlalchemy.exc
from kombu.exceptions import OperationalError as BrokerOperationalError

from config.settings import Settings
from pipeline.parse.supervisor import ParserUnavailable
from pipeline.types import DocumentText, ParsedDocument, PipelineError
from storage import documents, jobs
from storage.blobs import BlobStore
from storage.db import session_scope
from storage.models import Document, DocumentStatus
from storage.passwords import PASSWORD_UNREADABLE, PasswordUnreadable, decrypt_password
from workers import dispatch
from workers.lease import Lease

log = logging.getLogger(__name__)

# Failures that say "try again later", never "this input is bad". A parser child that cannot start is
# this machine's problem, not the document's: the document stays `uploaded` until a worker can parse it.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError, redis.exceptions.ConnectionError, BrokerOperationalError, ParserUnavailable)
MAX_TRANSIENT_RETRIES = 5
INTERNAL_ERROR = "internal_error"


def backoff_s(retries: int) -> int:
    """2, 4, 8, 16, 32 s (capped at 60) before retry number retries+1: enough for a DB failover or a
    Redis restart."""
    return min(60, 2 ** (retries + 1))


class JobAborted(Exception):
    """The job's claim is gone (canceled by the API, re-queued by the reaper, deleted): stop, write nothing."""


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


# --- parse ------------------------------------------------------------------------------------------

def parse_document(settings: Settings, document_id: uuid.UUID | str, *, reparse: bool = False) -> str:
    """uploaded -> parsing -> parsed|failed, then release the document's queued jobs. Returns the status.

    A PDF password is read from the row (stored encrypted at upload, storage/passwords.py), so every
    parse of the document has it, a re-sent one included; the write that ends the parse erases it.
    """
    document_id = _uuid(document_id)
    url = settings.effective_database_url
    with session_scope(url) as s:
        attempt = documents.claim_document(s, document_id, settings.job_lease_s, reparse=reparse)
        doc = s.get(Document, document_id)
        if doc is None:
            log.info("parse %s: no such document (deleted?)", document_id)
            return "missing"
        status, sha256, filename, stored_password = doc.status, doc.sha256, doc.filename, doc.encrypted_password
    if attempt is None:
        # A duplicate or redelivered message: the parse already happened (or is running elsewhere).
        # Re-sending the document's queued jobs is harmless and heals a release the broker lost.
        if status in (DocumentStatus.parsed, DocumentStatus.failed):
            _release_jobs(settings, document_id)
        log.info("parse %s: not claimable (status %s)", document_id, status)
        return str(status)

    log.info("parse %s (%s) attempt %d", document_id, filename, attempt)
    what = f"parse {document_id}"
    with Lease(lambda: _with_session(url, documents.extend_document_lease, document_id, attempt, settings.job_lease_s),
               settings.job_lease_s, what):
        try:
            password = decrypt_password(settings, stored_password) if stored_password else None
            parsed, text = _parse_and_chunk(settings, BlobStore(settings.effective_blob_dir).path(sha256), password)
        except PasswordUnreadable as exc:  # this worker lacks the API's key: a deployment error, said plainly
            return _finish_failed_parse(settings, document_id, attempt, PASSWORD_UNREADABLE, str(exc))
        except PipelineError as exc:
            return _finish_failed_parse(settings, document_id, attempt, exc.code, exc.message)
        except TRANSIENT_ERRORS:
            _give_back(url, documents.release_document, document_id, attempt)
            raise
        except Exception as exc:
            log.exception("parse %s: unexpected error", document_id)
            return _finish_failed_parse(settings, document_id, attempt, INTERNAL_ERROR,
                                        f"{type(exc).__name__}: {exc}")
    try:
        with session_scope(url) as s:
            stored = documents.store_parsed_document(s, document_id, attempt, parsed, text)
    except TRANSIENT_ERRORS:
        _give_back(url, documents.release_document, document_id, attempt)
        raise
    if not stored:
        log.warning("parse %s: claim lost before storing; result dropped", document_id)
        return "lost"
    log.info("parse %s: parsed, %d pages, %d tokens, %d chunks", document_id, len(parsed.pages),
             text.token_count, len(text.chunks))
    _release_jobs(settings, document_id)
    return str(DocumentStatus.parsed)


def _parse_and_chunk(settings: Settings, path: Path, password: str | None) -> tuple[ParsedDocument, DocumentText]:
    from pipeline.chunk import build_document_text
    from pipeline.parse import ParseLimits, parse_file
    from pipeline.tasks import tokenizer_spec
    from pipeline.tokens import load_tokenizer

    if not path.is_file():
        raise PipelineError("parse_error", "the uploaded file is missing from the blob store")
    limits = ParseLimits(max_pages=settings.max_pages, timeout_s=settings.parse_timeout_s,
                         memory_mb=settings.parse_memory_mb)
    parsed = parse_file(path, password=password, extractor=settings.pdf_extractor, limits=limits)
    tokenizer = load_tokenizer(tokenizer_spec(settings.engine, model=settings.model,
                                              embedding_model=settings.embedding_model))
    text = build_document_text(parsed.pages, tokenizer=tokenizer, chunk_tokens=settings.chunk_tokens,
                               overlap_tokens=settings.chunk_overlap_tokens)
    if not text.full_text.strip():
        # Never "parsed with zero chunks": a document with no text cannot be summarized or cited.
        raise PipelineError("no_text_layer", f"no page of {len(parsed.pages)} has extractable text "
                            f"({parsed.needs_ocr_pages} need OCR)")
    return parsed, text


def _finish_failed_parse(settings: Settings, document_id: uuid.UUID, attempt: int, code: str, message: str) -> str:
    log.info("parse %s failed: %s: %s", document_id, code, message)
    with session_scope(settings.effective_database_url) as s:
        if not documents.fail_document(s, document_id, attempt, code, message):
            return "lost"
        jobs.fail_queued_jobs(s, document_id, code, f"document failed to parse: {message}")
    return str(DocumentStatus.failed)


def _release_jobs(settings: Settings, document_id: uuid.UUID) -> None:
    """After the parse outcome is committed: send the waiting jobs to the gpu queue (or fail them)."""
    with session_scope(settings.effective_database_url) as s:
        doc = s.get(Document, document_id)
        if doc is None:
            return
        if doc.status == DocumentStatus.failed:
            jobs.fail_queued_jobs(s, document_id, doc.error_code or "parse_error",
                               f"document failed to parse: {doc.error_message or doc.error_code}")
            return
        job_ids = jobs.queued_jobs_to_send(s, document_id)
    if job_ids:
        # One message per document: its body claims every queued job of the document, so they run
        # together on one gpu worker and share the document's prefill.
        dispatch.enqueue_job(settings, job_ids[0])


# --- helpers ----------------------------------------------------------------------------------------

def _with_session(url: str, fn: Callable[..., bool], *args: Any) -> bool:
    with session_scope(url) as s:
        return fn(s, *args)


def _give_back(url: str, fn: Callable[..., bool], row_id: uuid.UUID, attempt: int) -> None:
    """Hand a claim back before a retry; if the DB is down too, the lease expiry lets the reaper do it."""
    try:
        _with_session(url, fn, row_id, attempt)
    except Exception as exc:
        log.warning("could not hand back claim on %s (the reaper will): %s", row_id, exc)
