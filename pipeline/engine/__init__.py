"""MPT runtime in plain PyTorch: config, model, attention backends, KV cache, load, generate, score,
and the serving engine (pipeline/engine/serving.py) over its torch-free core (pipeline/engine/core/).

Names are resolved lazily (PEP 562), so importing the torch-free core (`pipeline.engine.core`) does
not import torch. `load` and `score` are imported from their modules (pipeline.engine.load /
.score): a package attribute of a submodule's name is replaced by the submodule once it is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionBackend": "pipeline.engine.attention",
    "select_backend": "pipeline.engine.backends",
    "KVCache": "pipeline.engine.cache",
    "MptConfig": "pipeline.engine.config",
    "alibi_slopes": "pipeline.engine.config",
    "Completion": "pipeline.engine.stream",
    "DenseGenerator": "pipeline.engine.generate",
    "Generator": "pipeline.engine.facade",
    "ServingEngine": "pipeline.engine.serving",
    "EngineConfig": "pipeline.engine.serving",
    "prefill_chunked": "pipeline.engine.prefill",
    "CheckpointError": "pipeline.engine.load",
    "load_model": "pipeline.engine.load",
    "Mpt": "pipeline.engine.model",
    "SamplingParams": "pipeline.engine.core.requests",
    "score_texts": "pipeline.engine.score",
    "Tokenizer": "pipeline.engine.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
