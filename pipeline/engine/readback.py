"""A launched step's results on their way from the device to the host, without a stream sync.

The serving engine plans step N + 1 while step N runs (async scheduling): so nothing in a launch
may wait for the device. The sampled tokens, their log-probabilities and any scoring values are
copied into pinned host buffers by non-blocking copies queued behind the step, and a CUDA event
marks their arrival; `result()` waits for that event only (not for the steps queued after it) and
reads the buffers. Off CUDA everything has already run, and `result()` reads the tensors as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class StepResult:
    sampled: dict[str, tuple[int, float]] = field(default_factory=dict)  # seq id -> (token, its log p)
    scored: dict[str, list[float]] = field(default_factory=dict)  # seq id -> log p of targets computed now


def host_tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor that can be copied to `device` with non_blocking=True and no sync:
    pinned on CUDA (a pageable source makes the copy wait), as is elsewhere."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    return t.pin_memory() if device.type == "cuda" else t


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return host_tensor(values, device).to(device, non_blocking=True)


class StepReadback:
    """Device results of one step: `sampled_ids[i]` got token picks[i, 0] with log p picks[i, 1] (one
    float64 tensor [N, 2], exact for token ids, so one copy brings both back); scored (seq id,
    values [n]) pairs, concatenated for one copy."""

    def __init__(self, sampled_ids: list[str], picks: torch.Tensor | None,
                 scored: list[tuple[str, torch.Tensor]]) -> None:
        self.sampled_ids = sampled_ids
        self.scored_spans = [(sid, t.numel()) for sid, t in scored]
        parts = {"picks": picks, "scored": torch.cat([t for _, t in scored]) if scored else None}
        self._event: torch.cuda.Event | None = None
        self._host: dict[str, torch.Tensor | None] = {}
        for name, t in parts.items():
            if t is not None and t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t = host
                if self._event is None:
                    self._event = torch.cuda.Event()
            self._host[name] = t
        if self._event is not None:
            self._event.record()

    def result(self) -> StepResult:
        if self._event is not None:
            self._event.synchronize()
        out = StepResult()
        picks, scored = self._host["picks"], self._host["scored"]
        if picks is not None:
            out.sampled = {sid: (int(token), logprob)
                           for sid, (token, logprob) in zip(self.sampled_ids, picks.tolist(), strict=True)}
        if scored is not None:
            values, at = scored.tolist(), 0
            for sid, n in self.scored_spans:
                out.scored[sid] = values[at : at + n]
                at += n
        return out
