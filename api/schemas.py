"""Request and response bodies: XCreate is what a client sends, XPublic what it gets back."""

from __future__ import annotations

import functools
import operator
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, create_model

from pipeline.tasks import REGISTRY
from storage.models import Document, DocumentStatus, Job, JobStatus, TaskName


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; every stored time is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class _DocumentedAs:
    """Validate and serialize as the annotated type (stored JSON passes through unchanged), but show
    `documented` in the OpenAPI schema: the task registry's params and result models."""

    def __init__(self, documented: Any) -> None:
        self.documented = documented

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> Any:
        return handler(TypeAdapter(self.documented).core_schema)


def _any_of(models: list[type[BaseModel]]) -> Any:
    union = models[0]
    for model in models[1:]:
        union = union | model
    return union


TaskParams = Annotated[dict[str, Any], _DocumentedAs(_any_of([t.params for t in REGISTRY.values()]))]
TaskResult = Annotated[dict[str, Any] | None,
                       _DocumentedAs(_any_of([t.result for t in REGISTRY.values()]) | None)]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["document 3f2c0c6e-... not found"])


class ErrorPublic(BaseModel):
    error: ErrorDetail


class DocumentPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    filename: str
    sha256: str
    bytes: int
    media_type: str | None
    status: DocumentStatus
    pages: int | None
    needs_ocr_pages: int | None
    tokens: int | None
    warnings: list[Any]
    error: ErrorDetail | None
    created_at: UtcDatetime
    updated_at: UtcDatetime

    @classmethod
    def of(cls, doc: Document) -> DocumentPublic:
        error = ErrorDetail(code=doc.error_code, message=doc.error_message or "") if doc.error_code else None
        return cls(id=doc.id, filename=doc.filename, sha256=doc.sha256, bytes=doc.bytes, media_type=doc.media_type,
                   status=doc.status, pages=doc.pages, needs_ocr_pages=doc.needs_ocr_pages, tokens=doc.tokens,
                   warnings=doc.warnings or [], error=error, created_at=doc.created_at, updated_at=doc.updated_at)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskName
    params: TaskParams = Field(default_factory=dict, description="The task's params (defaults fill in the rest).",
                               examples=[{"questions": ["What is the termination notice period?"]}])


def _job_create_for(task: str) -> type[BaseModel]:
    """JobCreate as it is for one task: the OpenAPI schema pairs each task with its own params model,
    so a schema-valid body is one the route accepts ({"task": "qa"} needs params with questions)."""
    params = REGISTRY[task].params
    required = any(field.is_required() for field in params.model_fields.values())
    return create_model(f"JobCreate{task.capitalize()}", __config__=ConfigDict(extra="forbid"),
                        task=(Literal[task], ...),
                        params=(params, ...) if required else (params, Field(default_factory=dict)))


# The route validates JobCreate (then the task's params, for the registry's error messages); the schema
# shows the union by task.
JobCreateBody = Annotated[JobCreate, _DocumentedAs(Annotated[
    functools.reduce(operator.or_, [_job_create_for(task) for task in REGISTRY]), Field(discriminator="task")])]


class JobPublic(BaseModel):
    id: uuid.UUID
    document_id: uuid.UUID
    task: TaskName
    params: TaskParams
    status: JobStatus
    progress: float
    stage: str | None
    result: TaskResult = Field(description="Present when status is succeeded: the task's result model.")
    error: ErrorDetail | None = Field(description="Present when status is failed.")
    attempts: int
    created_at: UtcDatetime
    updated_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None

    @classmethod
    def of(cls, job: Job, result: dict[str, Any] | None = None) -> JobPublic:
        """`result` is the Result payload when the caller loaded it (shown only once succeeded)."""
        error = ErrorDetail(code=job.error_code, message=job.error_message or "") if job.error_code else None
        result = result if job.status == JobStatus.succeeded else None
        return cls(id=job.id, document_id=job.document_id, task=job.task, params=job.params, status=job.status,
                   progress=job.progress, stage=job.stage, result=result, error=error, attempts=job.attempts,
                   created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at,
                   finished_at=job.finished_at)


def job_public_json(row: Mapping[str, Any]) -> bytes:
    """The poll body: job_public_dict rendered by orjson, times in UTC with a Z (naive ones from
    SQLite are UTC too)."""
    return orjson.dumps(job_public_dict(row), option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def job_public_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """JobPublic's fields, in its order, from a storage.jobs.get_job_view row: the poll path
    serializes this with orjson instead of validating a JobPublic (a measurable share of a poll's CPU).
    tests/test_api_jobs.py checks it renders exactly as JobPublic does."""
    error = {"code": row["error_code"], "message": row["error_message"] or ""} if row["error_code"] else None
    return {"id": row["id"], "document_id": row["document_id"], "task": row["task"], "params": row["params"],
            "status": row["status"], "progress": row["progress"], "stage": row["stage"],
            "result": row["result"] if row["status"] == JobStatus.succeeded else None, "error": error,
            "attempts": row["attempts"], "created_at": row["created_at"], "updated_at": row["updated_at"],
            "started_at": row["started_at"], "finished_at": row["finished_at"]}


class DocumentUploadPublic(DocumentPublic):
    created: bool = Field(description="False when the same bytes were already uploaded by this key (200).")
    jobs: list[JobPublic] = Field(description="Jobs created by this upload's tasks/question/labels fields.")


class DocumentListPublic(BaseModel):
    items: list[DocumentPublic]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class JobListPublic(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorPublic, "description": text} for status, text in {
        401: "missing or invalid API key", 404: "unknown id (or another key's)",
        # Replaces FastAPI's default 422 (its HTTPValidationError is not what this API sends).
        422: "a path, query or body parameter breaks the schema",
        503: "database or broker unreachable"}.items()}

INVALID_CURSOR: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorPublic, "description": "`invalid_cursor`: not a cursor this server issued"}}

CursorQuery = Annotated[str | None, Query(
    description="`next_cursor` of the previous page (opaque; anything else answers 400 invalid_cursor).")]
