"""`longdoc batch --api` against a real `longdoc serve` + `longdoc worker -Q parse,gpu` (Postgres, Redis),
and the client's backoff against a real HTTP server that answers 429 / 503."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from longdoc.batch.api_client import ApiClient, ApiError, Stopped
from storage.db import session_scope
from storage.models import Document, Job
from tests.corpus_expectations import EXPECTED
from tests.fixtures_workers import ServiceSetup, free_port, serve_process
from tests.test_batch import SUBSET, TASK_ARGS, corpus_copy, final_results, records, run_batch, settled_now  # noqa: F401

API_SUBSET = [p for p in SUBSET if not p.startswith("c/")]  # the small documents: the service polls take seconds


def _counts(service: ServiceSetup) -> tuple[int, int]:
    with session_scope(service.settings.effective_database_url) as s:
        return s.scalar(select(func.count()).select_from(Document)), s.scalar(select(func.count()).select_from(Job))


def test_batch_through_a_running_service(service: ServiceSetup, corpus_copy: Path, tmp_path: Path,  # noqa: F811
                                         capsys: pytest.CaptureFixture) -> None:
    service.start_worker("parse,gpu")
    port = free_port()
    out = tmp_path / "api.jsonl"
    api = ["--api", f"http://127.0.0.1:{port}", "--api-key", service.api_key, "--concurrency", "8",
           "--exclude", "c"]
    with serve_process(service.env(api_port=port), tmp_path, tmp_path / "serve.log", port):
        status, stdout = run_batch(capsys, corpus_copy, out, *api)
        assert status == 1, stdout
        got = records(out)
        assert sorted(got) == sorted(API_SUBSET)
        for copy in API_SUBSET:
            record, expected = got[copy], EXPECTED[SUBSET[copy]]
            if expected.status == "failed":
                assert record["status"] == "failed" and record["error"]["code"] == expected.code, record
            else:
                assert record["status"] == "ok" and set(record["results"]) == {"summarize", "qa", "classify"}, record
                assert record["mode"] == "api" and record["document_id"] and len(record["jobs"]) == 3
        assert got["a/copies/same-bytes-other-name.pdf"]["duplicate_of"] == "a/contract-galera-joint-filing.pdf"
        documents, jobs = _counts(service)
        # Known-bad bytes (empty, not a supported type) never leave this machine; identical files go once.
        assert documents == len(API_SUBSET) - 3

        # A second run uploads and creates nothing.
        status, stdout = run_batch(capsys, corpus_copy, out, *api)
        assert status == 1 and settled_now(stdout) == 0 and _counts(service) == (documents, jobs), stdout

        # A run stopped after it submitted a document's jobs resumes by polling those jobs.
        before = final_results(out)
        lines = out.read_text().splitlines()
        i = next(i for i, line in enumerate(lines) if '"a/form-sf424-page2.pdf"' in line)
        submitted = {**json.loads(lines[i]), "status": "submitted", "results": {}, "timings": {}}
        lines[i] = json.dumps(submitted)
        out.write_text("\n".join(lines) + "\n")
        status, stdout = run_batch(capsys, corpus_copy, out, *api)
        assert status == 1 and settled_now(stdout) == 1, stdout
        assert _counts(service) == (documents, jobs)  # nothing uploaded, no job created
        assert final_results(out) == before


class _Flaky(http.server.BaseHTTPRequestHandler):
    """429 with Retry-After: 1, then 503 without it, then 200; 401 on /v1/denied."""

    calls: list[float] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.calls.append(time.monotonic())
        if self.path == "/v1/denied":
            self._reply(401, {"error": {"code": "unauthorized", "message": "no"}})
        elif len(self.calls) == 1:
            self._reply(429, {"error": {"code": "rate_limited", "message": "slow down"}}, {"Retry-After": "1"})
        elif len(self.calls) == 2:
            self._reply(503, {"error": {"code": "database_unavailable", "message": "later"}})
        else:
            self._reply(200, {"ok": True})

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[str]:
    _Flaky.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_waits_what_retry_after_says_then_backs_off(flaky_server: str) -> None:
    client = ApiClient(flaky_server, "ld_key", stop=threading.Event(), max_wait_s=30)
    body, _ = client.json("GET", "/v1/anything")
    assert body == {"ok": True} and client.retries == 2
    calls = _Flaky.calls
    assert calls[1] - calls[0] >= 0.95  # the 429's Retry-After: 1
    assert calls[2] - calls[1] >= 0.7  # 503 without Retry-After: the second backoff step (1 s +-25%)
    with pytest.raises(ApiError) as refused:
        client.json("GET", "/v1/denied")
    assert refused.value.status == 401 and refused.value.code == "unauthorized"


def test_client_gives_up_after_its_deadline_and_stops_when_asked(flaky_server: str) -> None:
    client = ApiClient(flaky_server, "ld_key", stop=threading.Event(), max_wait_s=0.5)
    with pytest.raises(ApiError) as gave_up:  # the first answer asks for 1 s: more than the deadline
        client.request("GET", "/v1/anything")
    assert gave_up.value.code == "api_unavailable" and gave_up.value.retryable
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        ApiClient(flaky_server, "ld_key", stop=stop).request("GET", "/v1/anything")
