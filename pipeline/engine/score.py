"""Log-likelihood of given continuations after one shared prefix (classification uses it).

The prefix is prefilled once into a single cache row; each continuation then runs at positions
[P, P + len) of that row, overwriting the previous continuation's K/V (the prefix part is never
touched), so scoring N labels costs one prefix prefill plus N short forwards and no cache copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.engine.model import Mpt
from pipeline.engine.prefill import DEFAULT_CHUNK, prefill_chunked
from pipeline.engine.tokenizer import Tokenizer


@torch.inference_mode()
def score(
    model: Mpt,
    prefix: Sequence[int],
    continuations: Sequence[Sequence[int]],
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> list[float]:
    """Sum of log p(continuation token | prefix, earlier continuation tokens) per continuation."""
    if not prefix:
        raise ValueError("score needs a non-empty prefix")
    if any(not c for c in continuations):
        raise ValueError("continuations must be non-empty")
    if not continuations:
        return []
    p = len(prefix)
    longest = max(len(c) for c in continuations)
    cache = model.new_cache(1, p + longest)
    first = torch.log_softmax(prefill_chunked(model, prefix, cache, chunk_size=chunk_size), dim=-1)  # [V]
    totals = []
    for cont in continuations:
        total = first[cont[0]].double()
        inputs = torch.tensor(list(cont[:-1]), dtype=torch.long, device=model.device)
        targets = torch.tensor(list(cont[1:]), dtype=torch.long, device=model.device)
        for s in range(0, len(inputs), chunk_size):
            logits = model.prefill(inputs[s : s + chunk_size][None], cache, start=p + s, logits_from=0)  # [1, T, V]
            logp = torch.log_softmax(logits[0], dim=-1)  # [T, V]
            chunk_targets = targets[s : s + chunk_size]
            total = total + logp.gather(-1, chunk_targets[:, None]).double().sum()
        totals.append(float(total))
    return totals


def score_texts(
    model: Mpt, tokenizer: Tokenizer, prefix: str, continuations: Sequence[str], *, chunk_size: int = DEFAULT_CHUNK
) -> list[float]:
    """`score` on text: prefix and each continuation are tokenized separately."""
    return score(model, tokenizer.encode(prefix), [tokenizer.encode(c) for c in continuations],
                 chunk_size=chunk_size)
