"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling with an explicit RNG."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

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


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (per row), renormalized.
    probs [B, V] -> [B, V]."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def select_next(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B] int64. With one generator per row, each sequence's
    samples depend only on its own seed and logits, never on what else shares the batch."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits / params.temperature, dim=-1), params.top_p)
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])
