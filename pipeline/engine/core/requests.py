"""What callers submit to the serving engine and what comes back (torch-free).

A `GenerateRequest` continues a prompt; a `ScoreRequest` asks for the log-likelihood of given
continuations after one prefix (classification). Both are plain data: the engine
(pipeline/engine/serving.py) turns them into scheduler sequences, and a Future resolves to a
`GenerateResult` / `ScoreResult`, or raises `EngineError` with a stable code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

# EngineError codes: the request could never run (too_long), was withdrawn (canceled), the engine
# stopped before it finished (shutdown), or failed inside the engine (engine_error).
ERROR_CODES = ("too_long", "canceled", "shutdown", "engine_error", "invalid_request")

_ids = itertools.count()


def next_request_id() -> str:
    return f"req-{next(_ids)}"


class EngineError(Exception):
    """A request that ended without a result, with one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    # token ids that end the sequence like end-of-text (not part of the output): special tokens such as
    # ChatML's <|im_end|>, which decoding drops, so no stop string can see them
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


@dataclass
class GenerateRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=next_request_id)
    # called on the engine thread with each new token id as it is accepted (streaming); keep it cheap
    on_token: Callable[[int], None] | None = None


@dataclass
class ScoreRequest:
    prefix_ids: list[int]
    continuations: list[list[int]]
    request_id: str = field(default_factory=next_request_id)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache (not recomputed)
    logprobs: list[float]  # log p of each generated token under the model (before any sampling filter)


@dataclass(frozen=True)
class ScoreResult:
    logprobs: list[float]  # summed log p of each continuation given the prefix
    token_logprobs: list[list[float]]  # per continuation, log p of each of its tokens
    cached_tokens: int  # prefix tokens served from the prefix cache, summed over continuations
