"""Engine selection (load_engine, tokenizer_spec) on this CPU-only machine, and the MPT seam.

torch here is the CPU wheel, so "no GPU" is real, not mocked. The GPU-present branch is reached by
patching the CUDA probe only: that hardware cannot exist here.
"""

from __future__ import annotations

import logging

import pytest

import pipeline.tasks as tasks
from pipeline.tasks import load_engine, tokenizer_spec
from pipeline.types import PipelineError

MINILM = "all-MiniLM-L6-v2"


def _fake_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mpt"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    return tmp_path


def test_extractive_engine_loads_offline(extractive_engine):
    assert extractive_engine.kind == "extractive"
    assert extractive_engine.tokenizer_spec == MINILM
    vectors = extractive_engine.embed(["The agreement is governed by Nevada law.",
                                       "Nevada law governs this agreement.",
                                       "MapReduce runs on a large cluster of machines."])
    assert vectors.shape == (3, 384)
    assert abs(float((vectors ** 2).sum(axis=1).max()) - 1.0) < 1e-4  # L2-normalized
    # paraphrases are much closer than unrelated text
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_mpt_without_gpu_is_a_clear_model_error(tmp_path):
    with pytest.raises(PipelineError) as info:
        load_engine("mpt", model=str(_fake_checkpoint(tmp_path)), device="cuda", embedding_model=MINILM)
    assert info.value.code == "model_error"
    assert "no CUDA GPU" in info.value.message


def test_auto_falls_back_to_extractive_and_says_why(caplog, extractive_engine):
    with caplog.at_level(logging.INFO, logger="pipeline.tasks"):
        engine = load_engine("auto", model="mosaicml/mpt-7b-storywriter", device="cuda", embedding_model=MINILM)
    assert engine is extractive_engine  # loaded once per process, whatever asked for it
    assert any("engine auto -> extractive: no CUDA GPU" in r.getMessage() for r in caplog.records)


def test_auto_with_gpu_and_weights_still_avoids_the_unbuilt_mpt_path(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tasks, "_cuda_available", lambda: True)  # the one thing that cannot exist here
    monkeypatch.setattr(tasks, "mpt_tasks_available", lambda: False)  # as before pipeline/tasks/mpt/ exists
    checkpoint = str(_fake_checkpoint(tmp_path))
    with caplog.at_level(logging.INFO, logger="pipeline.tasks"):
        engine = load_engine("auto", model=checkpoint, device="cuda", embedding_model=MINILM)
    assert engine.kind == "extractive"
    assert any("MPT-backed task path is not built" in r.getMessage() for r in caplog.records)
    with pytest.raises(PipelineError, match="MPT-backed task path is not built"):
        load_engine("mpt", model=checkpoint, device="cuda", embedding_model=MINILM)


def test_mpt_routes_to_the_mpt_loader_and_strategies(tmp_path, monkeypatch):
    """With the MPT path present, "mpt" (CPU allowed when asked for) and "auto" (CUDA) load through the
    registry's MPT loader, and run_task dispatches by the engine's kind."""
    loaded = []

    class FakeMpt:
        kind, tokenizer_spec = "mpt", "ckpt"

    def fake_loader(**kwargs):
        loaded.append(kwargs)
        return FakeMpt()

    monkeypatch.setattr(tasks, "mpt_tasks_available", lambda: True)
    monkeypatch.setattr(tasks, "load_mpt_engine", fake_loader)
    checkpoint = str(_fake_checkpoint(tmp_path))
    assert load_engine("mpt", model=checkpoint, device="cpu", embedding_model=MINILM).kind == "mpt"
    assert loaded == [{"model": checkpoint, "device": "cpu", "embedding_model": MINILM}]
    with pytest.raises(PipelineError, match="no CUDA GPU"):  # auto wants a GPU for MPT
        load_engine("mpt", model=checkpoint, device="cuda", embedding_model=MINILM)
    monkeypatch.setattr(tasks, "_cuda_available", lambda: True)
    assert load_engine("auto", model=checkpoint, device="cuda", embedding_model=MINILM).kind == "mpt"
    assert tokenizer_spec("auto", model=checkpoint, embedding_model=MINILM) == checkpoint


def test_an_engine_kind_without_strategy_is_a_model_error():
    from tests.fixtures_tasks import document_from_pages

    class Odd:
        kind, tokenizer_spec = "gpt", "x"

    with pytest.raises(PipelineError) as info:
        tasks.run_task(Odd(), "qa", {"question": "why?"}, document_from_pages(["Some text here."]),
                       lambda f, s: None)
    assert info.value.code == "model_error" and "no qa strategy for engine kind 'gpt'" in info.value.message


def test_mpt_with_gpu_but_no_weights_names_the_model(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "_cuda_available", lambda: True)
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(PipelineError) as info:
        load_engine("mpt", model=missing, device="cuda", embedding_model=MINILM)
    assert info.value.code == "model_error" and "not present locally" in info.value.message


def test_unknown_kinds_and_models_are_model_errors():
    with pytest.raises(PipelineError, match="unknown engine kind 'gpt'"):
        load_engine("gpt", model="x", device="cpu", embedding_model=MINILM)
    with pytest.raises(PipelineError, match="unknown engine kind"):
        tokenizer_spec("gpt", model="x", embedding_model=MINILM)
    with pytest.raises(PipelineError) as info:
        load_engine("extractive", model="x", device="cpu", embedding_model="bge-large-en")
    assert info.value.code == "model_error" and "not available offline" in info.value.message


def test_resolve_local_weights(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    assert tasks.resolve_local_weights(str(_fake_checkpoint(checkpoint))) == checkpoint
    (tmp_path / "empty").mkdir()
    assert tasks.resolve_local_weights(str(tmp_path / "empty")) is None
    # a hub id that is not in the local cache resolves to None without touching the network
    assert tasks.resolve_local_weights("longdoc-tests/definitely-not-cached") is None


def test_tokenizer_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "mpt_tasks_available", lambda: False)
    assert tokenizer_spec("extractive", model="m", embedding_model=MINILM) == MINILM
    assert tokenizer_spec("mpt", model="/ckpt/mpt", embedding_model=MINILM) == "/ckpt/mpt"
    # auto follows the engine auto would use for the tasks: extractive while the MPT path is unbuilt
    assert tokenizer_spec("auto", model=str(_fake_checkpoint(tmp_path)), embedding_model=MINILM) == MINILM
