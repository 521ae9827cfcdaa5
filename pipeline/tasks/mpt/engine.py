"""The engine object the MPT strategies receive: the serving engine plus what the tasks need to know.

The registry loads it through MPT_LOADER (pipeline/tasks/registry.py) as
`load_engine(model=..., device=..., embedding_model=...)`; the worker may pass the rest from settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.tasks.mpt.prompts import PROMPT_FAMILY_SETTINGS


@dataclass
class MptEngine:
    serving: Any  # pipeline.engine.serving.ServingEngine: submit / cancel / tokenizer / max_model_len
    tokenizer_spec: str  # the chunker tokenizes with the checkpoint's own tokenizer
    prompt_family: str = "auto"  # "auto" (detected from the checkpoint) | "completion" | "instruct" | "chat"
    embedding_model: str | None = None  # for retrieval (pipeline/tasks/retrieval.py)
    kind: str = "mpt"

    def __post_init__(self) -> None:
        if self.prompt_family not in PROMPT_FAMILY_SETTINGS:
            raise ValueError(f"prompt_family must be one of {', '.join(PROMPT_FAMILY_SETTINGS)}, "
                             f"not {self.prompt_family!r}")

    def shutdown(self) -> None:
        self.serving.shutdown()


def load_engine(*, model: str, device: str, embedding_model: str, prompt_family: str = "auto",
                max_seq_len: int | None = None, config: Any = None) -> MptEngine:
    """Load the checkpoint into a ServingEngine (its own thread owns the device)."""
    from pipeline.engine.serving import ServingEngine

    serving = ServingEngine.load(model, device=device, max_seq_len=max_seq_len, config=config)
    return MptEngine(serving, tokenizer_spec=model, prompt_family=prompt_family, embedding_model=embedding_model)
