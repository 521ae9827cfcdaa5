"""The upload's unit of work (POST /v1/documents): sniff, stage the bytes, then one transaction under the
content lock that finds or inserts the rows, places the blob and commits.

The route (api/routes/documents.py) parses the form and sends the parse after the commit.
"""

from __future__ import annotations

import logging
import uuid
from typing import BinaryIO

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from api.errors import ApiError
from config.settings import Settings
from pipeline.parse import sniff_media_type
from storage import documents as repo
from storage import jobs as job_repo
from storage.blobs import BlobStore, TooLarge
from storage.models import Document, DocumentStatus, Job
from storage.passwords import PASSWORD_UNREADABLE, SecretKeyMissing, encrypt_password

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
# A document that failed on one of these parses again (and its jobs that failed with it run) when the
# same bytes come with a password.
REPARSE_ON_PASSWORD = {"password_required", "wrong_password", PASSWORD_UNREADABLE}


def sniff(fileobj: BinaryIO) -> str:
    """The media type the first bytes say (400 empty, 415 unsupported); the file is left at its start."""
    head = fileobj.read(SNIFF_BYTES)
    fileobj.seek(0)
    if not head:
        raise ApiError(400, "empty_file", "the uploaded file is empty")
    media_type = sniff_media_type(head)
    if media_type is None:
        raise ApiError(415, "unsupported_media_type",
                       "unsupported file type (detected from its bytes): send a PDF, text, Markdown, HTML or DOCX file")
    return media_type


def clean_filename(name: str | None) -> str:
    # NUL: Postgres text cannot hold it.
    base = (name or "").replace("\x00", "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base[:512] or "upload"


def attach_jobs(session: Session, doc: Document, specs: list[tuple[str, dict]],
                idempotency_key: str | None = None) -> list[Job]:
    """The requested (task, params) as queued jobs of the document; 409 on a document that failed."""
    if specs and doc.status == DocumentStatus.failed:
        raise ApiError(409, "document_failed",
                       f"document {doc.id} failed to parse ({doc.error_code}); jobs cannot run on it")
    return [job_repo.add_job(session, doc, task, params, idempotency_key) for task, params in specs]


def replayed_jobs(doc: Document, specs: list[tuple[str, dict]], idempotency_key: str | None) -> list[Job]:
    """The jobs a replayed upload (same Idempotency-Key) asked for: each request for (task, params) is
    answered by the job its first attempt created under that key, so a retried upload creates no
    second set of jobs. A request that the first attempt did not make is refused: the key names one
    request."""
    available = sorted((j for j in doc.jobs if j.idempotency_key == idempotency_key),
                       key=lambda j: (j.created_at, str(j.id)))
    answered: list[Job] = []
    for task, params in specs:
        match = next((j for j in available if j.task == task and j.params == params), None)
        if match is None:
            raise ApiError(409, "idempotency_key_reused",
                           f"this Idempotency-Key was already used for an upload without this {task} job")
        available.remove(match)
        answered.append(match)
    return answered


def _encrypted(settings: Settings, password: str | None) -> str | None:
    """The password as the row keeps it until the parse ends; refused (before the file is read) when
    this service has no key to keep it with."""
    if password is None:
        return None
    try:
        return encrypt_password(settings, password)
    except SecretKeyMissing as exc:
        raise ApiError(400, "secret_key_missing", str(exc)) from exc


def store_upload(settings: Settings, session: Session, blobs: BlobStore, owner: uuid.UUID | None,
                  upload: UploadFile, specs: list[tuple[str, dict]], password: str | None,
                  idempotency_key: str | None) -> tuple[Document, list[Job], bool, bool]:
    """The file is staged (hashed into a temp file of the blob store) outside any transaction; then one
    transaction takes the content lock, finds or inserts the rows, places the blob under its name and
    commits. Until that placement only the temp file exists, so an upload whose transaction fails (the
    database down, a conflict) leaves no blob that no row refers to; a commit that fails after it
    removes the blob it placed when no document uses it. Returns (document, new jobs, created, parse_needed)."""
    media_type = sniff(upload.file)
    encrypted_password = _encrypted(settings, password)
    try:
        staged = blobs.stage(upload.file, settings.max_upload_bytes)
    except TooLarge as exc:
        raise ApiError(413, "too_large", f"the file exceeds the upload limit of {exc.max_bytes} bytes") from exc
    sha256, placed = staged.sha256, False
    try:
        for attempt in (1, 2):  # a concurrent upload of the same bytes can win the unique index once
            try:
                repo.lock_content(session, sha256)
                doc = repo.find_by_idempotency_key(session, owner, idempotency_key) if idempotency_key else None
                if doc is not None and doc.sha256 != sha256:
                    raise ApiError(409, "idempotency_key_reused",
                                   "this Idempotency-Key was already used for a different file")
                replay = doc is not None  # the same request again (a retry after a 503 or a timeout)
                doc = doc or repo.find_by_sha256(session, owner, sha256)
                # a keyed upload that found a document another upload created is known by its jobs
                replay = replay or (idempotency_key is not None and doc is not None
                                    and any(j.idempotency_key == idempotency_key for j in doc.jobs))
                created = doc is None
                # A replay re-sends an unparsed document's parse: its first send may have failed.
                parse_needed = created or (replay and doc.status == DocumentStatus.uploaded)
                if doc is None:
                    doc = Document(owner_id=owner, filename=clean_filename(upload.filename), sha256=sha256,
                                   bytes=staged.size, media_type=media_type, status=DocumentStatus.uploaded,
                                   idempotency_key=idempotency_key, encrypted_password=encrypted_password)
                    session.add(doc)
                    session.flush()
                elif doc.status == DocumentStatus.failed and password and doc.error_code in REPARSE_ON_PASSWORD:
                    repo.reset_for_reparse(doc, encrypted_password)
                    # Its jobs failed for the same reason: they wait for this parse, which releases them.
                    job_repo.requeue_jobs_failed_with(session, doc.id, REPARSE_ON_PASSWORD)
                    parse_needed = True
                jobs = (replayed_jobs(doc, specs, idempotency_key) if replay
                        else attach_jobs(session, doc, specs, idempotency_key))
                session.flush()
                # Under the content lock, last before the commit (a delete cannot release it in between).
                placed = blobs.place(staged) or placed
                session.commit()
                return doc, jobs, created, parse_needed
            except IntegrityError:
                session.rollback()
                if attempt == 2:
                    raise
    except BaseException:
        session.rollback()
        if placed:
            _release_unused_blob(session, blobs, sha256)
        raise
    finally:
        blobs.discard(staged)
    raise AssertionError("unreachable")


def _release_unused_blob(session: Session, blobs: BlobStore, sha256: str) -> None:
    """After a failed commit: remove the blob this upload placed, unless a document uses it. With the
    database still unreachable that cannot be checked, and the blob stays (a leak, never a loss)."""
    try:
        repo.release_blob(session, blobs, sha256)
    except Exception as exc:  # the upload's own error is the one to answer with
        session.rollback()
        log.warning("blob %s placed by a failed upload stays (cannot check its use now): %s", sha256, exc)
