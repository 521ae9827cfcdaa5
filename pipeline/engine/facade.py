"""`Generator`: the synchronous face of the serving engine (what `longdoc generate` and scripts use).

Each call submits its prompts to a ServingEngine that runs on the calling thread and waits for all
of them, so prompts sharing a prefix share its KV blocks and decode together, exactly as they would
from several clients. One caller at a time (a lock); services use ServingEngine.submit directly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.engine.core.requests import EngineError, GenerateRequest, SamplingParams, ScoreRequest
from pipeline.engine.model import Mpt
from pipeline.engine.serving import EngineConfig, ServingEngine
from pipeline.engine.stream import Completion
from pipeline.engine.tokenizer import Tokenizer


class Generator:
    def __init__(self, model: Mpt, tokenizer: Tokenizer, config: EngineConfig | None = None, *,
                 model_name: str = "mpt") -> None:
        self.model, self.tokenizer = model, tokenizer
        self.engine = ServingEngine(model, tokenizer, config, model_name=model_name, start_thread=False)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str | Path, *, device: torch.device | str = "cuda", dtype: torch.dtype | None = None,
             max_seq_len: int | None = None, config: EngineConfig | None = None) -> Generator:
        from pipeline.engine.load import load

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, tokenizer = load(spec, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return cls(model, tokenizer, config, model_name=str(spec))

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        return self.generate_ids([self.tokenizer.encode(p) for p in prompts], params)

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Completions in prompt order. A prompt that cannot run (empty, longer than the context) is a
        ValueError naming it, before anything runs."""
        limit = self.engine.max_model_len
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + params.max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} "
                                 f"it exceeds max_seq_len={limit} (load the model with a larger max_seq_len)")
        results = self._run([GenerateRequest(prompt_ids=list(p), params=params) for p in prompts])
        return [Completion(text=r.text, tokens=r.tokens, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens)
                for r in results]

    def generate_from_prefix(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                             params: SamplingParams) -> list[Completion]:
        """Prompts prefix + suffix each: the prefix is prefilled once and its blocks shared."""
        if not prefix or not suffixes or any(not s for s in suffixes):
            raise ValueError("generate_from_prefix needs a non-empty prefix and non-empty suffixes")
        return self.generate_ids([[*prefix, *s] for s in suffixes], params)

    def score(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Summed log-probability of each continuation after `prefix`."""
        if not continuations:
            return []
        (result,) = self._run([ScoreRequest(prefix_ids=list(prefix), continuations=[list(c) for c in continuations])])
        return result.logprobs

    def _run(self, requests: list) -> list:
        with self._lock:
            futures = [self.engine.submit(r) for r in requests]
            self.engine.run_until_idle()
        try:
            return [f.result() for f in futures]
        except EngineError as exc:
            raise ValueError(exc.message) from exc
