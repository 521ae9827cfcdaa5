"""MPT tasks end to end: the real app on Postgres, Celery over real Redis, a real `longdoc worker`
subprocess running a tiny random MPT checkpoint on CPU through the serving engine; a corpus PDF.
And, in-process with the same bodies, the count that matters: a document's jobs prefill it once."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from storage.db import session_scope
from storage.jobs import add_job
from storage.models import Document
from tests.fixtures_workers import ServiceSetup, api_client, poll_document, poll_job, upload

REPORT = "report-ntsb-accident-nyc08ca055.pdf"


@pytest.fixture(scope="module")
def tiny_mpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.engine.init_checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("worker-mpt"), seed=4)


def _mpt(service: ServiceSetup, model: Path) -> dict:
    return {"engine": "mpt", "device": "cpu", "model": str(model), "kv_cache_gb": 0.25, "kv_block_size": 64}


def _assert_cites_pages(span: dict, pages: int) -> None:
    assert 1 <= span["page_start"] <= span["page_end"] <= pages, span
    assert 0 <= span["char_start"] < span["char_end"], span


def test_summarize_qa_classify_on_mpt_through_api_redis_and_a_worker(service: ServiceSetup, corpus_dir: Path,
                                                                     tiny_mpt: Path) -> None:
    worker = service.start_worker("parse,gpu", **_mpt(service, tiny_mpt))
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / REPORT, tasks="summarize,qa,classify",
                     question=["Where did the accident happen?", "What was the weather?"])
        parsed = poll_document(client, h, doc["id"], timeout=120)
        assert parsed["status"] == "parsed", parsed
        jobs = {j["task"]: poll_job(client, h, j["id"], timeout=240) for j in doc["jobs"]}
    assert set(jobs) == {"summarize", "qa", "classify"}
    for job in jobs.values():
        assert job["status"] == "succeeded", job
        assert job["result"]["engine"] == "mpt" and job["result"]["model"]
    summary = jobs["summarize"]["result"]
    assert summary["tokens_in"] > 0 and summary["tokens_out"] > 0
    for citation in summary["citations"]:
        _assert_cites_pages(citation, parsed["pages"])
    answers = jobs["qa"]["result"]["answers"]
    assert [a["question"] for a in answers] == ["Where did the accident happen?", "What was the weather?"]
    for answer in answers:
        assert answer["answer"] and 0.0 <= answer["confidence"] <= 1.0
        for evidence in answer["evidence"]:
            _assert_cites_pages(evidence, parsed["pages"])
    label = jobs["classify"]["result"]
    assert label["label"] in label["scores"] and sum(label["scores"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(label["scores"]) == {"contract", "report", "paper", "form", "other"}
    assert "document" in worker.log() and worker.alive


def test_a_documents_jobs_prefill_it_once_and_a_rerun_hits_the_prefix_cache(service: ServiceSetup,
                                                                            corpus_dir: Path, tiny_mpt: Path) -> None:
    """The gpu body in-process (the bodies a worker runs, on the same Postgres): one document, three
    qa jobs queued together; the engine's counters say its prefix was computed once."""
    from workers import bodies, document_jobs
    from workers.transport import get_dispatcher

    settings = service.settings.model_copy(update=_mpt(service, tiny_mpt) | {"broker_url": None})
    with api_client(service.settings) as client:
        h = service.headers
        doc = upload(client, h, corpus_dir / REPORT)
    # no broker here: run the parse body ourselves (it releases no job: none exists yet)
    bodies.parse_document(settings, doc["id"], dispatcher=get_dispatcher(settings))
    questions = ["Who was the pilot?", "When did it happen?", "What failed?"]
    with session_scope(settings.effective_database_url) as s:
        document = s.get(Document, uuid.UUID(doc["id"]))
        jobs = [add_job(s, document, "qa", {"questions": [q]}) for q in questions]
        s.flush()
        ids = [j.id for j in jobs]
    engine = document_jobs.task_engine(settings)
    before = engine.serving.stats()
    assert document_jobs.run_job(settings, ids[0]) == "succeeded"
    # the siblings ran in the same body; their own messages are no-ops now
    assert [document_jobs.run_job(settings, i) for i in ids[1:]] == ["succeeded", "succeeded"]
    after = engine.serving.stats()
    computed = (after["tokens_in"] - before["tokens_in"]) - (after["prefix_hit_tokens"] - before["prefix_hit_tokens"])
    prompt_tokens = (after["tokens_in"] - before["tokens_in"]) // len(questions)
    assert after["requests"] - before["requests"] == len(questions)
    assert computed < 1.5 * prompt_tokens  # three prompts of one document, its prefix computed once
    # a re-run of one job on the same document finds the document in the prefix cache
    with session_scope(settings.effective_database_url) as s:
        job = add_job(s, s.get(Document, uuid.UUID(doc["id"])), "qa", {"questions": ["Why?"]})
        s.flush()
        rerun = job.id
    hits = engine.serving.stats()["prefix_hit_tokens"]
    assert document_jobs.run_job(settings, rerun) == "succeeded"
    assert engine.serving.stats()["prefix_hit_tokens"] - hits > 0.8 * prompt_tokens
