"""A gpu worker's /metrics (workers/engine_metrics.py): a real `longdoc worker` subprocess with a tiny
random MPT checkpoint on CPU, Celery over real Redis, the real app on Postgres; the engine's series
are served by the worker process and move when a job runs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_workers import ServiceSetup, api_client, poll_document, poll_job, upload

REPORT = "report-ntsb-accident-nyc08ca055.pdf"


@pytest.fixture(scope="module")
def tiny_mpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.engine.init_checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("metrics-mpt"), seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


def scrape_when(port: int, ready, timeout: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            values = scrape(port)
            if ready(values):
                return values
        except httpx.TransportError:
            values = {}
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics not ready in {timeout} s: {values}")
        time.sleep(0.3)


def test_gpu_worker_serves_engine_metrics_that_move_after_a_job(service: ServiceSetup, corpus_dir: Path,
                                                                 tiny_mpt: Path) -> None:
    port = free_port()
    worker = service.start_worker("parse,gpu", engine="mpt", device="cpu", model=str(tiny_mpt), kv_cache_gb=0.25,
                                  kv_block_size=64, worker_metrics_port=port, worker_metrics_host="127.0.0.1")
    before = scrape_when(port, lambda v: v.get("longdoc_engine_loaded") == 1)
    blocks = before["longdoc_engine_kv_blocks_free"]
    assert blocks > 0 and before["longdoc_engine_kv_blocks_used"] == 0
    # the engine's warm-up at load (pipeline/engine/warmup.py) has already counted its own requests
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / REPORT, tasks="qa", question=["Where did the accident happen?"])
        assert poll_document(client, h, doc["id"], timeout=120)["status"] == "parsed"
        job = poll_job(client, h, doc["jobs"][0]["id"], timeout=240)
    assert job["status"] == "succeeded", job
    after = scrape(port)

    def moved(name: str) -> float:
        return after[name] - before[name]

    assert moved("longdoc_engine_requests_total") > 0
    assert moved("longdoc_engine_prompt_tokens_total") > 0
    assert moved("longdoc_engine_generated_tokens_total") > 0
    assert moved("longdoc_engine_steps_total") > 0 and moved("longdoc_engine_busy_seconds_total") > 0
    assert 0 < moved("longdoc_engine_launch_seconds_total") <= moved("longdoc_engine_busy_seconds_total")
    assert moved("longdoc_engine_scheduled_tokens_total") >= moved("longdoc_engine_prompt_tokens_total") - \
        moved("longdoc_engine_prefix_hit_tokens_total")
    # the job's requests have ended: nothing holds blocks, and the document's full blocks stay cached
    assert after["longdoc_engine_running_sequences"] == after["longdoc_engine_waiting_sequences"] == 0
    assert after["longdoc_engine_kv_blocks_used"] == 0 and after["longdoc_engine_kv_blocks_cached"] > 0
    assert after["longdoc_engine_kv_blocks_free"] == blocks
    assert worker.alive
