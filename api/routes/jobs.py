"""/v1/jobs: poll one job, list jobs, cancel a job."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from api.deps import OwnerDep, ReadSessionDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import (
    ERROR_RESPONSES,
    INVALID_CURSOR,
    CursorQuery,
    ErrorPublic,
    JobListPublic,
    JobPublic,
    job_public_json,
)
from storage import documents as document_repo
from storage import jobs as repo
from storage.models import Job, JobStatus
from storage.paging import InvalidCursor
from workers.transport import get_dispatcher

router = APIRouter(prefix="/v1", tags=["jobs"])

# How soon a poller should come back; short while running (progress moves), longer while queued.
RETRY_AFTER_S = {JobStatus.queued: "5", JobStatus.running: "2"}


def _owned_job(session: Session, owner: uuid.UUID | None, job_id: uuid.UUID) -> Job:
    job = repo.get_job(session, owner, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id} not found")
    return job


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=ERROR_RESPONSES)
async def get_job(job_id: uuid.UUID, request: Request, owner: OwnerDep) -> Response:
    """Status, progress and, once succeeded, the result. `Retry-After` is set until the job is terminal."""
    # The hot path (clients poll this): one SELECT on the event loop (storage/hot_reads.py), no session
    # dependency, the body rendered by orjson from a plain dict; response_model still documents it.
    row = await repo.get_job_view(request.app.state.hot_reads, owner, job_id)
    if row is None:
        raise ApiError(404, "not_found", f"job {job_id} not found")
    status = JobStatus(row["status"])
    headers = None if status.terminal else {"Retry-After": RETRY_AFTER_S[status]}
    return Response(job_public_json(row), headers=headers,
                    media_type="application/json")


@router.get("/jobs", response_model=JobListPublic, responses={**ERROR_RESPONSES, **INVALID_CURSOR})
def list_jobs(session: ReadSessionDep, owner: OwnerDep, document_id: uuid.UUID | None = None,
              status: JobStatus | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              cursor: CursorQuery = None) -> JobListPublic:
    """Newest first, optionally for one document and/or one status. Follow `next_cursor`."""
    if document_id is not None and document_repo.get_document(session, owner, document_id) is None:
        raise ApiError(404, "not_found", f"document {document_id} not found")
    try:
        page = repo.list_jobs(session, owner, limit=limit, cursor=cursor, document_id=document_id, status=status)
    except InvalidCursor as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from exc
    return JobListPublic(items=[JobPublic.of(j, j.result.payload if j.result else None) for j in page.items], next_cursor=page.next_cursor)


@router.delete("/jobs/{job_id}", response_model=JobPublic,
               responses={**ERROR_RESPONSES, 409: {"model": ErrorPublic, "description": "the job already finished"}})
def cancel_job(job_id: uuid.UUID, settings: SettingsDep, session: SessionDep, owner: OwnerDep) -> JobPublic:
    """Cancel a queued or running job. The DB status changes first; then the broker is asked to drop it."""
    job = _owned_job(session, owner, job_id)
    if not repo.cancel_job(session, job):
        raise ApiError(409, "job_terminal", f"job {job_id} is already {job.status.value}")
    session.commit()
    get_dispatcher(settings).request_cancel(job.id)
    return JobPublic.of(job)
