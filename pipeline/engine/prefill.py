"""Chunked prefill of one cache row: the shared first step of generation (generate.py) and scoring
(score.py), bounded activations and last-position logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.engine.cache import KVCache
from pipeline.engine.model import Mpt

DEFAULT_CHUNK = 2048


@torch.inference_mode()
def prefill_chunked(
    model: Mpt, ids: Sequence[int], cache: KVCache, *, row: int = 0, start: int = 0, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Write K/V of `ids` at positions [start, start + len) of cache row `row`, `chunk_size` tokens per
    forward; returns the float32 logits [vocab] of the last position."""
    if not ids:
        raise ValueError("cannot prefill an empty token sequence")
    tokens = torch.tensor(list(ids), dtype=torch.long, device=model.device)
    logits = None
    for s in range(0, len(ids), chunk_size):
        chunk = tokens[s : s + chunk_size][None]  # [1, T]
        is_last = s + chunk_size >= len(ids)
        logits = model.prefill(chunk, cache, start=start + s, rows=slice(row, row + 1),
                               logits_from=-1 if is_last else None)
    assert logits is not None
    return logits[0, -1]
