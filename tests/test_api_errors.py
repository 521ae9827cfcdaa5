"""Every error code as JSON {"error": {"code", "message"}}: 400, 404, 405, 409 (elsewhere), 413, 415,
422, 500 (no stack trace), 503 with the database or the broker down, and the unmigrated-DB refusal."""

from __future__ import annotations

import os
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from storage import migrate
from storage.db import session_scope
from storage.models import Document, Job
from tests.fixtures_api import upload

CLOSED_PORT_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2"
CLOSED_PORT_REDIS = "redis://127.0.0.1:1/0"


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def _blob_dir_files(settings) -> list[str]:
    root = settings.effective_blob_dir
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files] if root.exists() else []


def test_empty_file_is_400(client, auth, corpus_dir, api_settings):
    _error(upload(client, auth, (corpus_dir / "hostile-empty-0-bytes.pdf").read_bytes()), 400, "empty_file")
    assert _blob_dir_files(api_settings) == []


def test_wrong_type_is_415_by_bytes_not_extension(client, auth, corpus_dir, api_settings):
    # an OpenDocument file renamed .pdf: the name lies, the bytes do not
    r = upload(client, auth, (corpus_dir / "hostile-odt-renamed.pdf").read_bytes(), name="looks-like.pdf")
    _error(r, 415, "unsupported_media_type")
    assert _blob_dir_files(api_settings) == []


def test_text_named_pdf_is_accepted_as_text(client, auth, corpus_dir):
    r = upload(client, auth, (corpus_dir / "contract-galera-joint-filing.txt").read_bytes(), name="x.pdf")
    assert r.status_code == 201 and r.json()["media_type"].startswith("text/")


def test_file_over_the_limit_is_413_and_leaves_nothing(client, auth, pdf_bytes, api_settings):
    limit = api_settings.max_upload_bytes
    too_big = pdf_bytes * (limit // len(pdf_bytes) + 1)  # a real PDF header, limit+ bytes
    assert limit < len(too_big) < limit + 1024 * 1024  # inside the form allowance: the blob store refuses
    _error(upload(client, auth, too_big), 413, "too_large")
    assert _blob_dir_files(api_settings) == []
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 0


def test_body_over_the_limit_is_413_before_parsing(client, auth, api_settings):
    huge = b"%PDF-1.7\n" + b"0" * (api_settings.max_upload_bytes + 2 * 1024 * 1024)
    _error(upload(client, auth, huge), 413, "too_large")  # refused by Content-Length, unread

    def chunks():  # no Content-Length: counted while received
        for _ in range(4):
            yield b"0" * (1024 * 1024)

    r = client.post("/v1/documents", headers={**auth, "Content-Type": "multipart/form-data; boundary=x"},
                    content=chunks())
    _error(r, 413, "too_large")
    assert _blob_dir_files(api_settings) == []


def test_json_body_over_1mib_is_413(client, auth):
    r = client.post(f"/v1/documents/{'0' * 8}-0000-0000-0000-{'0' * 12}/jobs", headers=auth,
                    json={"task": "qa", "params": {"questions": ["x" * (2 * 1024 * 1024)]}})
    _error(r, 413, "too_large")


def test_bad_requests_are_400_or_422(client, auth, pdf_bytes):
    _error(client.post("/v1/documents", headers=auth, data={"tasks": "summarize"}), 422, "validation_error")
    _error(client.post("/v1/documents", headers={**auth, "Content-Type": "text/plain"}, content=b"x"),
           422, "validation_error")
    _error(upload(client, auth, pdf_bytes, data={"tasks": "summarize,translate"}), 422, "invalid_params")
    _error(upload(client, auth, pdf_bytes, data={"labels": "just-one"}), 422, "invalid_params")
    _error(client.get("/v1/documents/not-a-uuid", headers=auth), 422, "validation_error")
    _error(client.get("/v1/documents", headers=auth, params={"limit": 0}), 422, "validation_error")
    _error(client.get("/v1/documents", headers=auth, params={"cursor": "garbage!"}), 400, "invalid_cursor")
    _error(client.post(f"/v1/documents/{'1' * 32}/jobs", headers={**auth, "Content-Type": "application/json"},
                       content=b"{not json"), 400, "invalid_json")  # unparsable: 400, documented


def test_unknown_ids_routes_and_methods(client, auth):
    missing = "00000000-0000-4000-8000-000000000000"
    _error(client.get(f"/v1/documents/{missing}", headers=auth), 404, "not_found")
    _error(client.get(f"/v1/jobs/{missing}", headers=auth), 404, "not_found")
    _error(client.delete(f"/v1/jobs/{missing}", headers=auth), 404, "not_found")
    _error(client.post(f"/v1/documents/{missing}/jobs", headers=auth, json={"task": "summarize"}), 404, "not_found")
    _error(client.get("/v1/nothing-here", headers=auth), 404, "not_found")
    _error(client.put("/v1/documents", headers=auth), 405, "method_not_allowed")
    assert client.put("/v1/documents", headers=auth).headers["allow"] == "GET, POST"


def test_unexpected_error_is_500_json_without_trace(api_settings):
    app = create_app(api_settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    err = _error(r, 500, "internal_error")
    assert "secret internals" not in r.text and "Traceback" not in r.text and "internal" in err["message"]


def test_database_down_is_503(api_settings, make_client, auth):
    down = api_settings.model_copy(update={"database_url": CLOSED_PORT_PG})
    client = make_client(down)  # starts (with a warning) so it can answer 503 until the DB is back
    _error(client.get("/v1/documents", headers=auth), 503, "database_unavailable")
    _error(client.get("/readyz"), 503, "not_ready")
    assert "database" in client.get("/readyz").json()["error"]["message"]
    assert client.get("/healthz").status_code == 200
    open_client = make_client(down.model_copy(update={"auth_enabled": False}))
    _error(open_client.get("/v1/jobs/00000000-0000-4000-8000-000000000000"), 503, "database_unavailable")


def test_broker_down_is_503_and_the_upload_is_kept(api_settings, make_client, auth, pdf_bytes):
    client = make_client(api_settings.model_copy(update={"broker_url": CLOSED_PORT_REDIS}))
    readyz = _error(client.get("/readyz"), 503, "not_ready")
    assert "broker" in readyz["message"]
    _error(upload(client, auth, pdf_bytes), 503, "broker_unavailable")
    # the DB is the source of truth: the document is stored (queued again by the reconciler) and a
    # retry of the same upload finds it instead of duplicating it
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 1


def test_an_upload_retried_with_its_idempotency_key_after_a_broker_503_adds_no_jobs(
        api_settings, make_client, auth, pdf_bytes):
    """The 503 comes after the commit: the document and its jobs are stored. The retry the answer
    invites (same key) answers with those jobs instead of creating a second set, once the broker is
    back too; the same key with other tasks is a different request."""
    key = {"Idempotency-Key": "retry-after-broker-503"}
    form = {"tasks": "summarize,classify"}
    down = make_client(api_settings.model_copy(update={"broker_url": CLOSED_PORT_REDIS}))
    _error(upload(down, auth, pdf_bytes, data=form, extra_headers=key), 503, "broker_unavailable")
    _error(upload(down, auth, pdf_bytes, data=form, extra_headers=key), 503, "broker_unavailable")
    up = make_client(api_settings)
    r = upload(up, auth, pdf_bytes, data=form, extra_headers=key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["created"] is False and sorted(j["task"] for j in body["jobs"]) == ["classify", "summarize"]
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 1
        job_ids = set(s.scalars(select(Job.id)).all())
    assert {uuid.UUID(j["id"]) for j in body["jobs"]} == job_ids and len(job_ids) == 2
    other = {"tasks": "summarize,classify", "labels": "invoice,letter"}  # classify with other params
    _error(upload(up, auth, pdf_bytes, data=other, extra_headers=key), 409, "idempotency_key_reused")
    # without the key, the same bytes with tasks are a new request for more work on the same document
    again = upload(up, auth, pdf_bytes, data={"tasks": "summarize"})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3


def test_a_keyed_upload_of_bytes_already_uploaded_without_a_key_is_idempotent_too(
        api_settings, make_client, auth, pdf_bytes):
    client = make_client(api_settings)
    first = upload(client, auth, pdf_bytes, data={"tasks": "summarize"})
    assert first.status_code == 201
    key = {"Idempotency-Key": "second-request"}
    answers = [upload(client, auth, pdf_bytes, data={"tasks": "summarize"}, extra_headers=key) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    keyed_jobs = {a.json()["jobs"][0]["id"] for a in answers}
    assert len(keyed_jobs) == 1 and keyed_jobs != {first.json()["jobs"][0]["id"]}
    with session_scope(api_settings.effective_database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2


def test_refuses_to_start_on_unmigrated_database(pg_url, api_redis_url, tmp_path):
    from config.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=pg_url, broker_url=api_redis_url)
    with pytest.raises(migrate.DatabaseNotMigrated, match="run `longdoc db upgrade`"), \
            TestClient(create_app(settings)):
        pass
    migrate.upgrade(pg_url, "head")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200


def test_readyz_and_metrics(client, auth, pdf_bytes):
    assert client.get("/readyz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
    doc = upload(client, auth, pdf_bytes).json()
    job = client.post(f"/v1/documents/{doc['id']}/jobs", headers=auth, json={"task": "summarize"}).json()
    client.get(f"/v1/jobs/{job['id']}", headers=auth)
    text = client.get("/metrics").text
    assert 'longdoc_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'longdoc_jobs{status="queued"} 1.0' in text
    assert 'longdoc_queue_depth{queue="parse"} 1.0' in text
    assert "longdoc_http_request_duration_seconds_bucket" in text


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    upload_body = spec["paths"]["/v1/documents"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(upload_body["schema"]["properties"]) == {"file", "tasks", "question", "labels", "password"}
    assert {"/v1/jobs/{job_id}", "/v1/documents/{document_id}/jobs", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "ErrorPublic" in spec["components"]["schemas"]
