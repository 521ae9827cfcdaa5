"""Fixtures for the queue/worker tests: a migrated Postgres + Redis service set-up, real `longdoc worker`
subprocesses (each in its own process group, so a test can SIGKILL the worker with its pool and parse
children, as a lost machine would), and the real app behind a TestClient.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from config.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# Fast leases and reaper ticks so recovery after a SIGKILL is seconds, not minutes.
# The lease leaves a busy worker's heartbeat (every lease/3) seconds of slack on a loaded 2-core box.
FAST_RECOVERY = {"job_lease_s": 5, "reaper_interval_s": 1.0, "reconcile_grace_s": 30.0}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; returns its value or fails the test with `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def settings_env(settings: Settings) -> dict[str, str]:
    """The LONGDOC_* environment that makes a subprocess build exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGDOC_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value  # dumped as "****"
        env[f"LONGDOC_{name.upper()}"] = str(secret)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(env: dict[str, str], cwd: Path, log_path: Path, port: int,
                  what: str = "longdoc serve") -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `longdoc serve` subprocess, yielded with its base URL once /readyz answers 200;
    terminated on exit (its returncode and log are left for the test to check)."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "longdoc.cli", "serve"], env=env, cwd=cwd,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert server.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, 0.3, what=f"{what} to answer /readyz")
        yield server, base
    finally:
        server.terminate()
        server.wait(30)


@dataclass
class WorkerProcess:
    """A real `longdoc worker` subprocess with its log file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "longdoc.cli", "worker", *self.args], env=self.env, cwd=self.log_path.parent,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout, 0.3, what=f"worker {self.args} to be ready")
        return self

    def ran(self, task_name: str) -> bool:
        """Whether this worker received a task of that name (the banner lists every name, so match the receipt)."""
        return f"Task {task_name}[" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker, its pool and its parse children, no cleanup."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 15) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(30)
            # The group may still hold children (beat, a parse child) when only the leader exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class ServiceSetup:
    settings: Settings
    tmp: Path
    api_key: str
    workers: list[WorkerProcess] = field(default_factory=list)

    def env(self, **overrides: Any) -> dict[str, str]:
        return settings_env(self.settings.model_copy(update=overrides))

    def start_worker(self, queues: str = "parse,gpu", *extra: str, ready: bool = True,
                     **overrides: Any) -> WorkerProcess:
        log_path = self.tmp / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess(["-Q", queues, *extra], self.env(**overrides), log_path).start()
        self.workers.append(worker)
        return worker.wait_ready() if ready else worker

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def make_api_key(settings: Settings) -> str:
    from storage.db import session_scope
    from storage.keys import create_key

    with session_scope(settings.effective_database_url) as s:
        _key, secret = create_key(s, "workers-test")
    return secret


@contextlib.contextmanager
def running_service(pg_url: str, broker_url: str, tmp_path: Path, **overrides: Any) -> Iterator[ServiceSetup]:
    """Migrated Postgres + the given broker + an API key, the extractive engine unless `overrides` say
    otherwise; workers started by the test are stopped after it."""
    from storage import migrate
    from storage.db import get_engine

    migrate.upgrade(pg_url)
    settings = Settings(**{"_env_file": None, "database_url": pg_url, "broker_url": broker_url,
                           "data_dir": tmp_path / "data", "engine": "extractive", "pdf_extractor": "pdfium",
                           **overrides})
    setup = ServiceSetup(settings, tmp_path, make_api_key(settings))
    try:
        yield setup
    finally:
        for worker in setup.workers:
            worker.stop()
        get_engine(pg_url).dispose()  # let the pg_url fixture drop the database


@pytest.fixture
def service(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[ServiceSetup]:
    """Migrated Postgres + flushed Redis + an API key; workers started by the test are killed after it."""
    # Other areas' tests share this Redis database: a per-test key prefix keeps our queues our own.
    with running_service(pg_url, redis_url, tmp_path, broker_key_prefix=f"t{uuid.uuid4().hex[:10]}:",
                         parse_timeout_s=120.0, **FAST_RECOVERY) as setup:
        yield setup


@pytest.fixture
def embedded_settings(tmp_path: Path) -> Iterator[Settings]:
    """Embedded mode: SQLite under a temp data dir, no broker; the in-process runner is shut down after."""
    from storage import migrate
    from workers.embedded import shutdown_all

    settings = Settings(_env_file=None, data_dir=tmp_path / "data", engine="extractive", pdf_extractor="pdfium",
                        parse_timeout_s=120.0, **FAST_RECOVERY)
    assert settings.embedded and settings.effective_database_url.startswith("sqlite")
    migrate.upgrade(settings.effective_database_url)
    try:
        yield settings
    finally:
        shutdown_all(wait=True)


def api_client(settings: Settings):  # noqa: ANN201 (fastapi.testclient.TestClient)
    """The real app (api.app.create_app) behind a TestClient."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    return TestClient(create_app(settings))


def upload(client: Any, headers: dict[str, str], path: Path, **form: Any) -> dict[str, Any]:
    with path.open("rb") as f:
        resp = client.post("/v1/documents", files={"file": (path.name, f, "application/octet-stream")},
                           data=form, headers=headers)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


# The most questions a job takes, on a 106-page contract: a second or more of extractive qa, long enough
# to be caught running (a summary of a short document ends in tens of milliseconds).
LONG_QA_FILE = "contract-verizon-abs-service.pdf"
LONG_QA_QUESTIONS = [f"What does section {i} say about {topic}?" for i in range(1, 5)
                     for topic in ("payment", "termination", "notice", "liability", "assignment")]


def create_long_qa_job(client: Any, headers: dict[str, str], doc_id: str) -> str:
    """Queue the long qa job on a parsed document; its id."""
    resp = client.post(f"/v1/documents/{doc_id}/jobs", headers=headers,
                       json={"task": "qa", "params": {"questions": LONG_QA_QUESTIONS}})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def poll_document(client: Any, headers: dict[str, str], doc_id: str, timeout: float,
                  until: tuple[str, ...] = ("parsed", "failed")) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/documents/{doc_id}", headers=headers).json()
        return body if body["status"] in until else None

    return wait_for(done, timeout, 0.3, what=f"document {doc_id} to reach {until}")


def poll_job(client: Any, headers: dict[str, str], job_id: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(done, timeout, 0.3, what=f"job {job_id} to finish")
