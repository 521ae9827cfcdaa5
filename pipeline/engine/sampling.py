"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling with an explicit RNG."""

from __future__ import annotations

import torch

from pipeline.engine.core.requests import SamplingParams

__all__ = ["SamplingParams", "greedy_pick", "select_next", "top_p_filter"]


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


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 -> (log p [N, V], greedy token ids [N] int64, their log p [N]). The serving
    decode step runs this inside its CUDA graph and the prefill rows eagerly: the same ops, so the same
    values either way."""
    logp = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    return logp, tokens, logp.gather(-1, tokens[:, None])[:, 0]
