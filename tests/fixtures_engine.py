"""Engine fixtures: tiny random MPT checkpoints written by our own init code, loaded by our loader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.engine import DenseGenerator, Mpt, Tokenizer
from pipeline.engine.init_checkpoint import init_checkpoint
from pipeline.engine.load import load

ENGINE_PROMPTS = [
    "The agreement shall terminate upon written notice",
    "Payment of fees",
    "Notwithstanding section 4, the licensee may assign this agreement to an affiliate with consent.",
]


@pytest.fixture
def engine_single_thread() -> Iterator[None]:
    """Tiny-model ops are microseconds long; on a shared, oversubscribed CI box a second intra-op
    thread mostly waits at OpenMP barriers for a descheduled peer (measured 8x slower decode steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MPT (d_model 64, 2 layers, 4 heads) with alibi_bias_max=8: the setting HF's MPT implements."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-mpt"), seed=1)


@pytest.fixture(scope="session")
def tiny_ckpt_sw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """StoryWriter-like settings HF's MPT does not honour: alibi_bias_max=16, clip_qkv, 6 heads
    (not a power of two: exercises llm-foundry's interleaved slopes)."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-mpt-sw"), seed=2, alibi_bias_max=16,
                           clip_qkv=0.4, n_heads=6, d_model=48, n_layers=3)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt: Path) -> tuple[Mpt, Tokenizer]:
    return load(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_generator(tiny_model: tuple[Mpt, Tokenizer]) -> DenseGenerator:
    model, tokenizer = tiny_model
    return DenseGenerator(model, tokenizer, chunk_size=2048, decode_mode="eager")


@pytest.fixture(scope="session")
def hf_tiny(tiny_ckpt: Path):
    from transformers import MptForCausalLM

    return MptForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
