"""A step's prefill chunks into the paged cache: each chunk its own forward, or all of them one.

Per chunk the result is the same either way: a generating sequence whose prompt the chunk completes
gets its last position's logits [V] (its first token is sampled from them), a scoring sequence gets
the log p of its target tokens appended to `scored`, anything else nothing. Together (`together`,
EngineConfig.batch_prefills) the chunks' tokens run one after another through one forward
(Mpt.prefill_segments): projections and MLP over all of them, attention chunk by chunk. A document's
task tails and label continuations are tens of tokens each, and a forward of their own each reads
every weight and launches every kernel again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.engine.core.scheduler import ScheduledSeq
from pipeline.engine.metadata import PrefillMeta
from pipeline.engine.model import Mpt
from pipeline.engine.paged_cache import PagedKVCache, norm_index
from pipeline.engine.readback import to_device


class ChunkPrefill:
    def __init__(self, model: Mpt, cache: PagedKVCache, *, together: bool = False) -> None:
        self.model, self.cache, self.together = model, cache, together
        self.device = model.device

    def run(self, chunks: Sequence[ScheduledSeq], scored: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor | None]:
        """Per chunk: its prompt's last logits [V] or None; scoring chunks append (seq id, log p [n])."""
        if self.together and len(chunks) > 1:
            return self._together(chunks, scored)
        return [self._one(chunk, scored) for chunk in chunks]

    def _meta(self, chunk: ScheduledSeq) -> PrefillMeta:
        seq = chunk.seq
        ids = tuple(seq.block_ids)
        return PrefillMeta(start=chunk.start, num_tokens=chunk.num_tokens, block_ids=ids,
                           block_index=to_device(np.asarray(ids, dtype=np.int64), self.device),
                           norm_index=norm_index(ids, chunk.start, chunk.num_tokens, self.cache.block_size,
                                                 self.cache.scratch_block, self.device))

    def _targets(self, chunk: ScheduledSeq) -> tuple[int, int]:
        """A scoring chunk's positions [lo, hi) whose next token is a target (empty when lo >= hi)."""
        seq = chunk.seq
        return max(chunk.start, seq.score_from), min(chunk.start + chunk.num_tokens, len(seq.token_ids) - 1)

    def _score(self, chunk: ScheduledSeq, lo: int, logits: torch.Tensor, scored: list[tuple[str, torch.Tensor]]) -> None:
        """(seq id, log p of the target tokens after positions lo, lo + 1, ...) from their logits [n, V]."""
        seq = chunk.seq
        logp = torch.log_softmax(logits, dim=-1)  # [n, V]
        targets = to_device(np.asarray(seq.token_ids[lo + 1 : lo + 1 + len(logits)], dtype=np.int64), self.device)
        scored.append((seq.seq_id, logp.gather(-1, targets[:, None])[:, 0].double()))

    def _one(self, chunk: ScheduledSeq, scored: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """One chunk of one sequence. Returns the last position's logits [V] when the chunk completes a
        generating sequence's prompt (its first token is sampled from them); a scoring chunk appends
        (seq id, log p of its target tokens, on the device) to `scored`."""
        seq, s, n = chunk.seq, chunk.start, chunk.num_tokens
        tokens = to_device(np.asarray(seq.token_ids[s : s + n], dtype=np.int64), self.device)[None]  # [1, T]
        meta = self._meta(chunk)
        if seq.score_from is None:
            logits = self.model.prefill(tokens, self.cache, meta=meta, logits_from=-1 if chunk.samples else None)
            return logits[0, -1] if logits is not None else None
        lo, hi = self._targets(chunk)
        if lo >= hi:
            self.model.prefill(tokens, self.cache, meta=meta, logits_from=None)
            return None
        logits = self.model.prefill(tokens, self.cache, meta=meta, logits_from=lo - s)  # [1, s + n - lo, V]
        self._score(chunk, lo, logits[0, : hi - lo], scored)
        return None

    def _together(self, chunks: Sequence[ScheduledSeq],
                  scored: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor | None]:
        """Every prefill chunk of the step as one forward (Mpt.prefill_segments): per chunk what
        `_one` returns and scores for it alone, the logits taken at the same positions."""
        ids: list[int] = []
        metas: list[PrefillMeta] = []
        wanted: list[int] = []  # positions along the joined tokens whose logits are needed
        spans: list[tuple[int, int]] = []  # per chunk: its first row in the logits, how many
        offset = 0
        for chunk in chunks:
            seq, s, n = chunk.seq, chunk.start, chunk.num_tokens
            ids.extend(seq.token_ids[s : s + n])
            metas.append(self._meta(chunk))
            if seq.score_from is None:
                rows = [offset + n - 1] if chunk.samples else []
            else:
                lo, hi = self._targets(chunk)
                rows = list(range(offset + lo - s, offset + hi - s))
            spans.append((len(wanted), len(rows)))
            wanted.extend(rows)
            offset += n
        tokens = to_device(np.asarray(ids, dtype=np.int64), self.device)[None]  # [1, T]
        index = to_device(np.asarray(wanted, dtype=np.int64), self.device) if wanted else None
        logits = self.model.prefill_segments(tokens, self.cache, metas, index)  # [R, V]
        out: list[torch.Tensor | None] = []
        for chunk, (first, count) in zip(chunks, spans, strict=True):
            if count:
                assert logits is not None
                if chunk.seq.score_from is None:
                    out.append(logits[first])
                    continue
                self._score(chunk, self._targets(chunk)[0], logits[first : first + count], scored)
            out.append(None)
        return out
