"""The remote back end: each document through a running longdoc service (`--api URL --api-key KEY`).

Per document, in one of `concurrency` threads: upload it with an Idempotency-Key derived from its
sha256 and the params (a repeated upload returns the same document), create one job per task with
exactly the params this run validated, journal a "submitted" record (document and job ids), then
poll the jobs, waiting what each poll's Retry-After asks. A run stopped or killed after that point
resumes by polling the same jobs instead of creating new ones. A PDF that refuses its password is
uploaded again with the next candidate from --password-file (the service then parses it again).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from longdoc.batch.api_client import ApiClient, ApiError, Stopped, error_of, retry_after_s
from longdoc.batch.passwords import PASSWORD_CODES, Passwords
from longdoc.batch.records import Record, fail, new_record
from longdoc.batch.request import TaskRequest

if TYPE_CHECKING:
    from longdoc.batch.runner import Batch, WorkItem

log = logging.getLogger(__name__)

WAIT_S = 0.25
TERMINAL = {"succeeded", "failed", "canceled"}
RETRYABLE_JOB_CODES = {"canceled", "worker_lost", "internal_error"}  # the service's trouble, not the file's
DEFAULT_POLL_S = 2.0


class RemoteBackend:
    mode = "api"

    def __init__(self, base_url: str, api_key: str, request: TaskRequest, passwords: Passwords,
                 concurrency: int, *, max_wait_s: float = 600.0) -> None:
        self.base_url, self.api_key, self.request, self.passwords = base_url, api_key, request, passwords
        self.concurrency = max(1, concurrency)
        self.max_wait_s = max_wait_s
        self.client: ApiClient | None = None
        self._submitted: queue.Queue[Record] = queue.Queue()

    def _client(self, stop: Any) -> ApiClient:
        if self.client is None:
            self.client = ApiClient(self.base_url, self.api_key, stop=stop, max_wait_s=self.max_wait_s)
        return self.client

    def check(self) -> None:
        """Nothing to check before the run: the first authenticated call in run() checks the key."""

    def _check_key(self, client: ApiClient) -> None:
        from longdoc.batch.runner import BatchFatal

        try:
            response = client.request("GET", "/v1/documents", params={"limit": 1})
        except ApiError as exc:
            raise BatchFatal(f"{self.base_url}: {exc.message}") from exc
        if response.status_code in (401, 403):
            raise BatchFatal(f"{self.base_url} refused the API key ({response.status_code})")
        if response.status_code != 200:
            raise BatchFatal(f"{self.base_url}/v1/documents answered {response.status_code}: is it a longdoc service?")

    def run(self, items: list[WorkItem], batch: Batch) -> None:
        client = self._client(batch.stop.requested)
        try:
            with contextlib.suppress(Stopped):
                self._check_key(client)
            pending, inflight = deque(items), {}
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="longdoc-api") as pool:
                while pending or inflight:
                    while pending and len(inflight) < self.concurrency and not batch.stop.requested.is_set():
                        item = pending.popleft()
                        batch.started(item)
                        inflight[pool.submit(self._process, client, item)] = item
                    if not inflight:
                        break
                    done, _ = wait(inflight, timeout=WAIT_S, return_when=FIRST_COMPLETED)
                    self._drain(batch)
                    for future in done:
                        item = inflight.pop(future)
                        record = self._result(future)
                        if record is not None:
                            batch.finished(item, record)
                self._drain(batch)
        finally:
            client.close()

    def _result(self, future: Future) -> Record | None:
        try:
            return future.result()
        except Stopped:
            return None  # abandoned: its submitted record (if any) lets the next run resume it

    def _drain(self, batch: Batch) -> None:
        while True:
            try:
                batch.submitted(self._submitted.get_nowait())
            except queue.Empty:
                return

    # --- one document, in a pool thread -------------------------------------------------------------

    def _process(self, client: ApiClient, item: WorkItem) -> Record:
        started = time.monotonic()
        record = new_record(item.file, item.key)
        record["mode"] = self.mode
        try:
            jobs = self._resumed(client, item, record)
            candidates: list[str | None] = self.passwords.candidates(item.file.rel) or [None]
            for i, password in enumerate(candidates):
                if jobs is None:
                    jobs = self._submit(client, item, record, password)
                outcomes = self._poll(client, jobs) if jobs else {}
                doc, _ = client.json("GET", f"/v1/documents/{record['document_id']}")
                code = (doc.get("error") or {}).get("code")
                if doc.get("status") == "failed" and code in PASSWORD_CODES and i < len(candidates) - 1:
                    jobs = None  # the next password: upload again, and the service parses it again
                    continue
                self._fill(record, doc, outcomes)
                break
        except ApiError as exc:
            fail(record, exc.code, exc.message, retryable=exc.retryable)
        except OSError as exc:  # the file went away or became unreadable after the scan
            fail(record, "unreadable", f"cannot read the file: {exc}", retryable=True)
        record["timings"]["total_s"] = round(time.monotonic() - started, 3)
        return record

    def _resumed(self, client: ApiClient, item: WorkItem, record: Record) -> dict[str, str] | None:
        """The jobs of a submitted record from an earlier run, when the service still has them."""
        resume = item.resume
        if resume is None or not resume.get("jobs") or not resume.get("document_id"):
            return None
        for job_id in resume["jobs"].values():
            if client.request("GET", f"/v1/jobs/{job_id}").status_code == 404:
                return None
        record.update(document_id=resume["document_id"], jobs=dict(resume["jobs"]))
        return dict(resume["jobs"])

    def _submit(self, client: ApiClient, item: WorkItem, record: Record, password: str | None) -> dict[str, str] | None:
        """Upload and create the jobs; None when the document has already failed (no jobs then)."""
        f = item.file

        def body(stack: contextlib.ExitStack) -> dict[str, Any]:
            handle = stack.enter_context(f.path.open("rb"))
            return {"files": {"file": (f.path.name, handle, "application/octet-stream")},
                    "data": {"password": password} if password else {}}

        uploaded, _ = client.json("POST", "/v1/documents", ok=(200, 201), body=body,
                                  headers={"Idempotency-Key": f"longdoc-batch:{item.key}"})
        record["document_id"] = uploaded["id"]
        jobs: dict[str, str] = {}
        for task, params in self.request.params.items():
            try:
                job, _ = client.json("POST", f"/v1/documents/{uploaded['id']}/jobs", ok=(202,),
                                     json={"task": task, "params": params})
            except ApiError as exc:
                if exc.code == "document_failed":
                    return None
                raise
            jobs[task] = job["id"]
        record["jobs"] = jobs
        self._submitted.put({**record, "status": "submitted", "timings": {}})
        return jobs

    def _poll(self, client: ApiClient, jobs: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Poll until every job is terminal; sleep what the polls' Retry-After asks (the shortest)."""
        outcomes: dict[str, dict[str, Any]] = {}
        while len(outcomes) < len(jobs):
            delays = []
            for task, job_id in jobs.items():
                if task in outcomes:
                    continue
                response = client.request("GET", f"/v1/jobs/{job_id}")
                if response.status_code != 200:
                    code, message = error_of(response)
                    raise ApiError(response.status_code, code, f"job {job_id}: {message}", retryable=True)
                job = response.json()
                if job["status"] in TERMINAL:
                    outcomes[task] = job
                else:
                    delays.append(retry_after_s(response.headers.get("Retry-After")) or DEFAULT_POLL_S)
            if delays:
                client._sleep(min(delays))
        return outcomes

    def _fill(self, record: Record, doc: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
        record.update(media_type=doc.get("media_type"), pages=doc.get("pages"), tokens=doc.get("tokens"))
        if doc.get("status") == "failed":
            error = doc.get("error") or {}
            fail(record, error.get("code", "parse_error"), error.get("message", ""))
            return
        for task, job in outcomes.items():
            if job["status"] == "succeeded":
                record["results"][task] = job["result"]
            else:
                error = job.get("error") or {"code": job["status"], "message": f"the job was {job['status']}"}
                fail(record, error["code"], error.get("message", ""), task=task,
                     retryable=error["code"] in RETRYABLE_JOB_CODES)
