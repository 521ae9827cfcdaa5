"""/v1/documents: upload (streamed to the blob store, deduped), get, list, delete, create jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import BlobsDep, OwnerDep, ReadSessionDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import (
    ERROR_RESPONSES,
    INVALID_CURSOR,
    CursorQuery,
    DocumentListPublic,
    DocumentPublic,
    DocumentUploadPublic,
    ErrorPublic,
    JobCreateBody,
    JobPublic,
)
from api.upload import attach_jobs, store_upload
from config.settings import Settings
from pipeline.tasks import TASKS, validate_params
from pipeline.tasks.schemas import (
    MAX_LABELS,
    MAX_QUESTION_CHARS,
    MAX_QUESTIONS,
    MIN_LABELS,
    NON_BLANK,
    PY_WHITESPACE,
)
from pipeline.types import PipelineError
from storage import documents as repo
from storage.models import Document, DocumentStatus, Job
from storage.paging import InvalidCursor
from workers.transport import get_dispatcher

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["documents"])

MAX_FORM_FIELD_BYTES = 64 * 1024

# The form's rules as JSON Schema (what _requested_jobs enforces): task names from the registry; each
# question non-blank and within the qa limits; labels blank or at least two. The rest is said in the
# descriptions, past what the schema can say here: the labels distinct ignoring case, `tasks=qa` needing
# a question (an if/then beside a binary field breaks schemathesis's generator), and the bytes of
# `file` being a document (they are sniffed: 415 otherwise).
_W = PY_WHITESPACE
_TASK_LIST = f"^[{_W}]*(?:{'|'.join(TASKS)})?[{_W}]*(?:,[{_W}]*(?:{'|'.join(TASKS)})?[{_W}]*)*$"
# Blank (only spaces and commas), or a non-blank label, a comma, and later another non-blank label.
_LABEL_LIST = f"^[{_W},]*$|[^{_W},][\\s\\S]*,[\\s\\S]*[^{_W},]"
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "The document (PDF, text, Markdown, HTML, DOCX), detected from its bytes."},
        "tasks": {"type": "string", "pattern": _TASK_LIST,
                  "description": f"Comma list of {','.join(TASKS)} to queue at upload (qa needs a `question`)."},
        "question": {"type": "array", "maxItems": MAX_QUESTIONS,
                     "items": {"type": "string", "pattern": NON_BLANK, "maxLength": MAX_QUESTION_CHARS},
                     "description": "A question for the qa task (repeat the field for several); implies qa."},
        "labels": {"type": "string", "pattern": _LABEL_LIST, "description": f"Comma list of {MIN_LABELS} to {MAX_LABELS} distinct labels "
                                                    "for classify (blank: the document types); implies classify."},
        "password": {"type": "string", "format": "password",
                     "description": "Password of an encrypted PDF: kept encrypted until the parse ends, then "
                                    "erased (400 `secret_key_missing` where the service has no key for it)."},
    }}}}}}


def _validated(task: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        return validate_params(task, params)
    except PipelineError as exc:
        raise ApiError(422, exc.code, exc.message) from exc


def _requested_jobs(tasks: str | None, questions: list[str], labels: str | None) -> list[tuple[str, dict]]:
    """The upload's form fields as validated (task, params) pairs; question/labels imply their task."""
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ApiError(422, "invalid_params", f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    label_list = [x.strip() for x in (labels or "").split(",") if x.strip()]
    if questions and "qa" not in names:
        names.append("qa")
    if label_list and "classify" not in names:
        names.append("classify")
    # classify without labels classifies by document type (the registry's default labels)
    params = {"summarize": {}, "qa": {"questions": questions}, "classify": {"labels": label_list} if label_list else {}}
    return [(name, _validated(name, params[name])) for name in dict.fromkeys(names)]


def _enqueue_jobs_if_parsed(settings: Settings, session: Session, doc: Document, jobs: list[Job]) -> None:
    """After the commit: jobs on a parsed document go now; otherwise the parse task releases them.
    The status is re-read so a parse that finished during our transaction cannot strand a job."""
    if not jobs:
        return
    session.refresh(doc)
    if doc.status == DocumentStatus.parsed:
        for job in jobs:
            get_dispatcher(settings).enqueue_job(job.id)


@router.post("/documents", status_code=201, response_model=DocumentUploadPublic, openapi_extra=_UPLOAD_BODY,
             responses={**ERROR_RESPONSES,
                        200: {"model": DocumentUploadPublic, "description": "the same bytes were already uploaded"},
                        400: {"model": ErrorPublic, "description": "empty file, malformed form, or a password "
                                                                   "this service cannot keep (`secret_key_missing`)"},
                        409: {"model": ErrorPublic, "description": "Idempotency-Key reused, or document failed"},
                        413: {"model": ErrorPublic, "description": "over the upload limit"},
                        415: {"model": ErrorPublic, "description": "unsupported file type"},
                        422: {"model": ErrorPublic, "description": "invalid tasks/question/labels, or no file"},
                        })
async def create_document(
    request: Request, response: Response, settings: SettingsDep, session: SessionDep, blobs: BlobsDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> DocumentUploadPublic:
    """Upload a document. Auth runs before the body is read (the form is parsed here, not by FastAPI),
    and the file is spooled to disk by the multipart parser, then streamed into the blob store."""
    async with request.form(max_files=1, max_fields=100, max_part_size=MAX_FORM_FIELD_BYTES) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "validation_error", "file: a multipart file field named `file` is required")
        fields = {name: form.getlist(name) for name in ("tasks", "question", "labels", "password")}
        if any(not isinstance(v, str) for values in fields.values() for v in values):
            raise ApiError(422, "validation_error", "tasks, question, labels and password must be text fields")
        specs = _requested_jobs(next(iter(fields["tasks"]), None), list(fields["question"]),
                                next(iter(fields["labels"]), None))
        password = next(iter(fields["password"]), None) or None
        doc, jobs, created, parse_needed = await run_in_threadpool(
            store_upload, settings, session, blobs, owner, upload, specs, password, idempotency_key)

    def after_commit() -> DocumentUploadPublic:  # DB and broker I/O: off the event loop
        if parse_needed:
            get_dispatcher(settings).enqueue_parse(doc.id)
        _enqueue_jobs_if_parsed(settings, session, doc, jobs)
        return DocumentUploadPublic(**DocumentPublic.of(doc).model_dump(), created=created,
                                    jobs=[JobPublic.of(j) for j in jobs])

    body = await run_in_threadpool(after_commit)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/documents/{doc.id}"
    return body


def _owned_document(session: Session, owner: uuid.UUID | None, document_id: uuid.UUID) -> Document:
    doc = repo.get_document(session, owner, document_id)
    if doc is None:
        raise ApiError(404, "not_found", f"document {document_id} not found")
    return doc


@router.get("/documents/{document_id}", response_model=DocumentPublic, responses=ERROR_RESPONSES)
def get_document(document_id: uuid.UUID, session: ReadSessionDep, owner: OwnerDep) -> DocumentPublic:
    return DocumentPublic.of(_owned_document(session, owner, document_id))


@router.get("/documents", response_model=DocumentListPublic, responses={**ERROR_RESPONSES, **INVALID_CURSOR})
def list_documents(session: ReadSessionDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                   cursor: CursorQuery = None) -> DocumentListPublic:
    """Newest first. Follow `next_cursor` until it is null."""
    try:
        page = repo.list_documents(session, owner, limit=limit, cursor=cursor)
    except InvalidCursor as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from exc
    return DocumentListPublic(items=[DocumentPublic.of(d) for d in page.items], next_cursor=page.next_cursor)


@router.delete("/documents/{document_id}", status_code=204, responses=ERROR_RESPONSES)
def delete_document(document_id: uuid.UUID, settings: SettingsDep, session: SessionDep, blobs: BlobsDep,
                    owner: OwnerDep) -> Response:
    """Deletes the document with its pages, chunks, jobs and results; the blob goes when no other
    document (of any key) has the same bytes. Queued or running jobs are canceled."""
    doc = _owned_document(session, owner, document_id)
    sha256 = doc.sha256
    active_jobs, unused = repo.delete_document(session, doc)
    session.commit()
    if unused:
        repo.release_blob(session, blobs, sha256)
    for job_id in active_jobs:
        get_dispatcher(settings).request_cancel(job_id)
    return Response(status_code=204)


@router.post("/documents/{document_id}/jobs", status_code=202, response_model=JobPublic,
             responses={**ERROR_RESPONSES,
                        400: {"model": ErrorPublic, "description": "`invalid_json`: the body is not JSON"},
                        409: {"model": ErrorPublic, "description": "the document failed to parse"},
                        413: {"model": ErrorPublic, "description": "a body over 1 MiB"},
                        422: {"model": ErrorPublic, "description": "invalid task params"}})
def create_job(document_id: uuid.UUID, body: JobCreateBody, response: Response, settings: SettingsDep,
               session: SessionDep, owner: OwnerDep) -> JobPublic:
    """Queue a task on the document; it runs once the document is parsed. Poll the Location."""
    doc = _owned_document(session, owner, document_id)
    params = _validated(body.task.value, body.params)
    (job,) = attach_jobs(session, doc, [(body.task.value, params)])
    session.commit()
    _enqueue_jobs_if_parsed(settings, session, doc, [job])
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.of(job)
