"""Jobs through the real app: create (202 + Location), poll (Retry-After), list, cancel; enqueue timing."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis

from storage.db import session_scope
from storage.models import Document, DocumentStatus, Job, JobStatus, Result, utcnow
from tests.fixtures_api import upload


def _set_document(settings, doc_id: str, status: DocumentStatus, **fields) -> None:  # noqa: ANN003
    """Stand in for the parse task's state change (the worker flow is tested by the workers' tests)."""
    with session_scope(settings.effective_database_url) as s:
        doc = s.get(Document, uuid.UUID(doc_id))
        doc.status = status
        for name, value in fields.items():
            setattr(doc, name, value)


def _revoke_listener(redis_url: str):  # noqa: ANN202 (a redis PubSub)
    """Celery's revoke is a broadcast: Redis pub/sub on the pidbox channel of this test's db only."""
    pubsub = redis.Redis.from_url(redis_url).pubsub()
    pubsub.subscribe(f"/{redis_url.rsplit('/', 1)[1]}.celery.pidbox")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    return pubsub


def _gpu_messages(api_redis_url: str) -> int:
    return redis.Redis.from_url(api_redis_url).llen("gpu")


@pytest.fixture
def doc_id(client, auth, pdf_bytes) -> str:
    return upload(client, auth, pdf_bytes).json()["id"]


def test_job_on_unparsed_document_stays_queued_without_message(client, auth, doc_id, api_redis_url):
    r = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["document_id"] == doc_id
    assert job["params"] == {"max_words": 200, "style": "paragraph"}  # normalized by pipeline.tasks.validate_params
    assert _gpu_messages(api_redis_url) == 0  # the parse task releases it


def test_job_on_parsed_document_is_enqueued_after_commit(client, auth, doc_id, api_settings, api_redis_url):
    _set_document(api_settings, doc_id, DocumentStatus.parsed, pages=3, tokens=1200)
    r = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth,
                    json={"task": "qa", "params": {"question": "Who pays?"}})
    assert r.status_code == 202
    assert r.json()["params"]["questions"] == ["Who pays?"]
    assert _gpu_messages(api_redis_url) == 1
    body = redis.Redis.from_url(api_redis_url).lindex("gpu", 0).decode()
    assert r.json()["id"] in body


def test_job_on_failed_document_is_409(client, auth, doc_id, api_settings):
    _set_document(api_settings, doc_id, DocumentStatus.failed, error_code="parse_error", error_message="bad xref")
    r = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "document_failed"
    doc = client.get(f"/v1/documents/{doc_id}", headers=auth).json()
    assert doc["error"] == {"code": "parse_error", "message": "bad xref"}


@pytest.mark.parametrize("body", [
    {"task": "qa", "params": {}},
    {"task": "classify", "params": {"labels": ["only-one"]}},
    {"task": "summarize", "params": {"max_words": "many"}},
    {"task": "summarize", "params": {"unknown": 1}},
])
def test_invalid_params_are_422_and_store_nothing(client, auth, doc_id, api_settings, body):
    r = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_params", r.text
    assert client.get("/v1/jobs", headers=auth).json()["items"] == []


def test_unknown_task_is_422(client, auth, doc_id):
    r = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "translate"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_poll_has_retry_after_until_terminal_and_shows_result(client, auth, doc_id, api_settings):
    job_id = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
    queued = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert queued.status_code == 200 and int(queued.headers["retry-after"]) > 0
    with session_scope(api_settings.effective_database_url) as s:  # what the gpu task would record
        job = s.get(Job, uuid.UUID(job_id))
        job.status, job.progress, job.stage, job.started_at = JobStatus.running, 0.5, "prefill", utcnow()
    running = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert running.json()["progress"] == 0.5 and running.json()["stage"] == "prefill"
    assert int(running.headers["retry-after"]) > 0
    with session_scope(api_settings.effective_database_url) as s:
        job = s.get(Job, uuid.UUID(job_id))
        job.status, job.progress, job.finished_at = JobStatus.succeeded, 1.0, utcnow()
        s.add(Result(job_id=job.id, payload={"summary": "Two parties agree.", "citations": [{"page": 1}]}))
    done = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert "retry-after" not in done.headers
    assert done.json()["result"] == {"summary": "Two parties agree.", "citations": [{"page": 1}]}
    assert done.json()["error"] is None
    listed = client.get("/v1/jobs", headers=auth, params={"status": "succeeded"}).json()["items"]
    assert [j["result"] for j in listed] == [done.json()["result"]]


def test_cancel_queued_job_then_cancel_again_is_409(client, auth, doc_id):
    job_id = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
    r = client.delete(f"/v1/jobs/{job_id}", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "canceled" and r.json()["finished_at"]
    assert "retry-after" not in client.get(f"/v1/jobs/{job_id}", headers=auth).headers
    again = client.delete(f"/v1/jobs/{job_id}", headers=auth)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_terminal"


def test_cancel_running_job_sets_db_status_and_revokes(client, auth, doc_id, api_settings, api_redis_url):
    job_id = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
    with session_scope(api_settings.effective_database_url) as s:
        s.get(Job, uuid.UUID(job_id)).status = JobStatus.running
    pubsub = _revoke_listener(api_redis_url)
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    with session_scope(api_settings.effective_database_url) as s:
        assert s.get(Job, uuid.UUID(job_id)).status == JobStatus.canceled
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None
    body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
    assert body["method"] == "revoke" and body["arguments"]["task_id"] == f"job-{job_id}"


def test_list_jobs_filters_and_paginates(client, auth, doc_id, other_pdf_bytes):
    other = upload(client, auth, other_pdf_bytes).json()["id"]
    mine = [client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
            for _ in range(3)]
    client.post(f"/v1/documents/{other}/jobs", headers=auth, json={"task": "summarize"})
    client.delete(f"/v1/jobs/{mine[0]}", headers=auth)

    everything = client.get("/v1/jobs", headers=auth).json()["items"]
    assert len(everything) == 4
    seen, cursor = [], None
    while True:
        body = client.get("/v1/jobs", headers=auth, params={
            "document_id": doc_id, "limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in body["items"]]
        if not (cursor := body["next_cursor"]):
            break
    assert seen == list(reversed(mine))
    canceled = client.get("/v1/jobs", headers=auth, params={"status": "canceled"}).json()["items"]
    assert [j["id"] for j in canceled] == [mine[0]]
    bad = client.get("/v1/jobs", headers=auth, params={"status": "nope"})
    assert bad.status_code == 422


def test_deleting_a_document_revokes_its_unfinished_jobs(client, auth, doc_id, api_redis_url):
    queued = client.post(f"/v1/documents/{doc_id}/jobs", headers=auth, json={"task": "summarize"}).json()["id"]
    pubsub = _revoke_listener(api_redis_url)
    assert client.delete(f"/v1/documents/{doc_id}", headers=auth).status_code == 204
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None
    body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
    assert body["method"] == "revoke" and body["arguments"]["task_id"] == f"job-{queued}"
    assert client.get(f"/v1/jobs/{queued}", headers=auth).status_code == 404
