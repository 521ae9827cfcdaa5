"""The parse body (the job body is workers/document_jobs.py); run by the Celery tasks (workers.tasks) and
the embedded thread pools (workers.embedded), which hand it the process's Dispatcher.

Each body takes ids, claims its row with a conditional UPDATE, holds a lease kept alive by a heartbeat
thread while it works, and writes its outcome fenced by the attempt number it claimed, so running a
body twice (broker redelivery, reaper re-queue, duplicate message) changes nothing the second time.
What the bodies share: the lease block (workers/lease.py run_leased) and how failures are told apart
(workers/failures.py).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from config.settings import Settings
from pipeline.types import DocumentText, ParsedDocument, PipelineError
from storage import documents, jobs
from storage.blobs import BlobStore
from storage.db import session_scope
from storage.models import Document, DocumentStatus
from storage.passwords import PASSWORD_UNREADABLE, PasswordUnreadable, decrypt_password
from workers.dispatch import Dispatcher
from workers.lease import Lease, LeasedRow, as_uuid, run_leased

log = logging.getLogger(__name__)


# --- parse ------------------------------------------------------------------------------------------

def parse_document(settings: Settings, document_id: uuid.UUID | str, *, dispatcher: Dispatcher,
                   reparse: bool = False) -> str:
    """uploaded -> parsing -> parsed|failed, then release the document's queued jobs. Returns the status.

    A PDF password is read from the row (stored encrypted at upload, storage/passwords.py), so every
    parse of the document has it, a re-sent one included; the write that ends the parse erases it.
    """
    document_id = as_uuid(document_id)
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
        # Re-sending the document's queued jobs heals a release that never happened (a worker died
        # between the store and the release), but not when they were sent within the grace: then the
        # release ran and this message only duplicates it (a lost one is the reconciler's to re-send).
        if status in (DocumentStatus.parsed, DocumentStatus.failed):
            _release_jobs(settings, dispatcher, document_id, unless_sent_within_s=settings.reconcile_grace_s)
        log.info("parse %s: not claimable (status %s)", document_id, status)
        return str(status)

    log.info("parse %s (%s) attempt %d", document_id, filename, attempt)
    lease_s = settings.job_lease_s
    row = LeasedRow(
        f"parse {document_id}", url, lease_s,
        extend=lambda s: documents.extend_document_lease(s, document_id, attempt, lease_s),
        give_back=lambda s: documents.release_document(s, document_id, attempt),
        fail=lambda code, message: _finish_failed_parse(settings, document_id, attempt, code, message),
        lost="lost")

    def work(_lease: Lease) -> tuple[ParsedDocument, DocumentText]:
        try:
            password = decrypt_password(settings, stored_password) if stored_password else None
        except PasswordUnreadable as exc:  # this worker lacks the API's key: a deployment error, said plainly
            raise PipelineError(PASSWORD_UNREADABLE, str(exc)) from exc
        return _parse_and_chunk(settings, BlobStore(settings.effective_blob_dir).path(sha256), password)

    def parsed_and_released(result: tuple[ParsedDocument, DocumentText]) -> str:
        parsed, text = result
        log.info("parse %s: parsed, %d pages, %d tokens, %d chunks", document_id, len(parsed.pages),
                 text.token_count, len(text.chunks))
        _release_jobs(settings, dispatcher, document_id)
        return str(DocumentStatus.parsed)

    return run_leased(row, work, lambda s, result: documents.store_parsed_document(s, document_id, attempt, *result),
                      parsed_and_released)


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


def _release_jobs(settings: Settings, dispatcher: Dispatcher, document_id: uuid.UUID, *,
                  unless_sent_within_s: float | None = None) -> None:
    """After the parse outcome is committed: send the waiting jobs to the gpu queue (or fail them)."""
    with session_scope(settings.effective_database_url) as s:
        doc = s.get(Document, document_id)
        if doc is None:
            return
        if doc.status == DocumentStatus.failed:
            jobs.fail_queued_jobs(s, document_id, doc.error_code or "parse_error",
                               f"document failed to parse: {doc.error_message or doc.error_code}")
            return
        job_ids = jobs.queued_jobs_to_send(s, document_id, unless_sent_within_s=unless_sent_within_s)
    if job_ids:
        # One message per document: its body claims every queued job of the document, so they run
        # together on one gpu worker and share the document's prefill.
        dispatcher.enqueue_job(job_ids[0])
