"""The OpenAPI schema says what the API does: schemathesis (every check, every phase, a fixed seed
and bounded examples) against a real `longdoc serve` process, plus the rules it found broken, pinned
down one by one: Allow headers, 400 for bodies that are not JSON, task rules in the schema, NUL
characters (which Postgres cannot store) refused with a 422, not a 500."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from config.settings import Settings
from pipeline.tasks.schemas import NON_BLANK
from storage.db import session_scope
from storage.models import Document, DocumentStatus
from tests.fixtures_api import upload
from tests.fixtures_workers import free_port, serve_process, settings_env

REPO_ROOT = Path(__file__).resolve().parents[1]
# Enough for every phase to reach each operation's rules (300+ cases, ~25 s on 2 cores); a fixed seed
# and deterministic generation make a failure reproducible with the same command.
MAX_EXAMPLES = 10


def test_schemathesis_all_checks_against_a_served_api(migrated_pg, api_redis_url, tmp_path, make_key):
    port = free_port()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=migrated_pg,
                        broker_url=api_redis_url, api_port=port, max_upload_bytes=2 * 1024 * 1024)
    header = make_key("schemathesis")["Authorization"]
    with serve_process(settings_env(settings), REPO_ROOT, tmp_path / "serve.log", port) as (_server, base):
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(REPO_ROOT / "tests" / "schemathesis.toml"),
             "run", f"{base}/openapi.json", "-H", f"Authorization: {header}",
             "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--generation-deterministic", "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=150)  # cwd: its cache stays out of the repo
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", out)
    assert summary and int(summary[1]) >= 300 and summary[1] == summary[2], out[-3000:]
    assert "Server error" not in out and "500 Internal" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize(("path", "allow"), [
    ("/v1/documents", "GET, POST"),
    ("/v1/documents/{doc}", "GET, DELETE"),
    ("/v1/documents/{doc}/jobs", "POST"),
    ("/v1/jobs", "GET"),
    ("/v1/jobs/{doc}", "GET, DELETE"),
])
def test_options_and_405_name_every_method_of_the_path(client, auth, path, allow):
    path = path.format(doc=uuid.uuid4())
    for method in ("OPTIONS", "PUT", "PATCH", "HEAD"):
        r = client.request(method, path, headers=auth)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
        assert method == "HEAD" or r.json()["error"]["code"] == "method_not_allowed"  # HEAD: no body


def test_schema_documents_what_the_routes_answer(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/documents", "/v1/jobs"):
        assert "invalid_cursor" in paths[path]["get"]["responses"]["400"]["description"]
    create_job = paths["/v1/documents/{document_id}/jobs"]["post"]
    assert {"400", "413", "422"} <= set(create_job["responses"])
    # Each task with its own params: qa's need questions, each non-blank.
    qa = spec["components"]["schemas"]["JobCreateQa"]
    assert qa["required"] == ["task", "params"]
    qa_params = spec["components"]["schemas"]["QaParams"]
    assert qa_params["oneOf"] == [{"required": ["questions"]}, {"required": ["question"]}]
    assert qa_params["properties"]["questions"]["items"]["pattern"] == NON_BLANK
    form = paths["/v1/documents"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["question"]["items"]["pattern"] == NON_BLANK
    # No route documents FastAPI's default 422 body: every error is ErrorPublic.
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def _parsed_document(client, auth, api_settings, content: bytes) -> str:  # noqa: ANN001
    doc_id = upload(client, auth, content).json()["id"]
    with session_scope(api_settings.effective_database_url) as s:
        s.get(Document, uuid.UUID(doc_id)).status = DocumentStatus.parsed
    return doc_id


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'{"task": "qa"}', 422, "invalid_params"),
    (b'{"task": "qa", "params": {"questions": ["  "]}}', 422, "invalid_params"),
    (b'{"task": "qa", "params": {"questions": ["a\\u0000b"]}}', 422, "invalid_params"),
    (b'{"task": "summarize", "params": {"focus": "\\u0000"}}', 422, "invalid_params"),
    (b'{"task": "summarize", "params": {"max_words": 50, "max_tokens": 80}}', 422, "invalid_params"),
])
def test_bad_job_bodies_are_4xx_with_their_code(client, auth, api_settings, pdf_bytes, body, status, code):
    doc_id = _parsed_document(client, auth, api_settings, pdf_bytes)
    r = client.post(f"/v1/documents/{doc_id}/jobs", headers={**auth, "Content-Type": "application/json"},
                    content=body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_nul_in_upload_fields_is_refused_or_dropped_not_a_500(client, auth, pdf_bytes):
    r = upload(client, auth, pdf_bytes, data={"question": "who\x00?"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_params", r.text
    # httpx would percent-encode the NUL in a filename: the raw byte, as a hostile client sends it.
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="con\x00tract.pdf"\r\n\r\n'
            + pdf_bytes + b"\r\n--b--\r\n")
    r = client.post("/v1/documents", headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
                    content=body)
    assert r.status_code == 201 and r.json()["filename"] == "contract.pdf", r.text


def test_empty_idempotency_key_is_a_422_not_a_500_on_its_second_use(client, auth, pdf_bytes, other_pdf_bytes):
    # Stored as "" once, the second upload under it hit the unique index: found by schemathesis.
    for content in (pdf_bytes, other_pdf_bytes):
        r = upload(client, auth, content, extra_headers={"Idempotency-Key": ""})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
