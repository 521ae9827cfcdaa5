"""MPT runtime in plain PyTorch: config, model, attention backends, KV cache, load, generate, score."""

from pipeline.engine.attention import AttentionBackend, select_backend
from pipeline.engine.cache import KVCache
from pipeline.engine.config import MptConfig, alibi_slopes
from pipeline.engine.generate import Completion, Generator, prefill_chunked
from pipeline.engine.load import CheckpointError, load, load_model
from pipeline.engine.model import Mpt
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.score import score, score_texts
from pipeline.engine.tokenizer import Tokenizer

__all__ = [
    "AttentionBackend",
    "CheckpointError",
    "Completion",
    "Generator",
    "KVCache",
    "Mpt",
    "MptConfig",
    "SamplingParams",
    "Tokenizer",
    "alibi_slopes",
    "load",
    "load_model",
    "prefill_chunked",
    "score",
    "score_texts",
    "select_backend",
]
