"""The seed's recipe for one document's tasks, the baseline of bench/tasks_mpt.py: HF transformers'
MptForCausalLM (bench/hf_reference.py, the same weights) with `generate`, one task after another.

Per document, truncated so that prompt + output fit `max_tokens` (HF's eager attention prefilled 16K
tokens on an H200 at a 117.5 GB peak and ran out of memory at 32K: ../shared/anchors/README.md):
  summary   one prompt (document + summary cue), generate(use_cache=True, greedy) of n tokens
  qa        each question its own prompt (the document prefilled again each time), generate of n tokens
  classify  one full forward per label over document + question + label (no prefix reuse), the label's
            summed log-likelihood; the best one wins
The prompts are our strategies' own (same family, same task wording), so both sides read the same
kind of text; generation lengths come from the caller (min_new_tokens = max_new_tokens), so random
weights cannot make one side stop early.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.tasks.mpt.classify import classify_task
from pipeline.tasks.mpt.prompts import PromptBuilder, TaskText
from pipeline.tasks.mpt.qa import qa_task
from pipeline.tasks.mpt.summarize import TOKENS_PER_WORD, summary_task
from pipeline.types import DocumentText


@dataclass(frozen=True)
class Lengths:
    """Tokens to generate for one document: the summary, then each question's answer."""

    summary: int
    answers: tuple[int, ...]


class HfRecipe:
    def __init__(self, hf: Any, builder: PromptBuilder, max_tokens: int, device: torch.device) -> None:
        self.hf, self.builder, self.max_tokens, self.device = hf, builder, max_tokens, device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prompt(self, doc_ids: list[int], task: TaskText, room_after: int) -> list[int]:
        budget = self.max_tokens - self.builder.overhead(task) - room_after
        return self.builder.prompt(doc_ids[: max(budget, 0)], task).ids

    @torch.inference_mode()
    def _generate(self, ids: list[int], n: int) -> int:
        x = torch.tensor([ids], device=self.device)
        out = self.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, use_cache=True, pad_token_id=self.builder.eos_id or 0)
        return out.shape[1] - x.shape[1]

    @torch.inference_mode()
    def _label_logprob(self, prefix: list[int], label: list[int]) -> float:
        x = torch.tensor([prefix + label], device=self.device)
        logits = self.hf(x, use_cache=False).logits[0, len(prefix) - 1 : -1].float()  # [len(label), V]
        logp = torch.log_softmax(logits, dim=-1)
        return float(logp.gather(1, torch.tensor(label, device=self.device)[:, None]).sum())

    def document(self, doc: DocumentText, questions: Sequence[str], labels: Sequence[str],
                 lengths: Lengths) -> dict[str, Any]:
        """Seconds per task and what was read and written, for one document."""
        doc_ids = self.builder.document(doc.full_text)
        out: dict[str, Any] = {"doc_tokens": len(doc_ids), "tokens_in": 0, "tokens_out": 0}
        self.sync()
        t0 = time.perf_counter()
        words = max(10, int(lengths.summary / TOKENS_PER_WORD))
        ids = self._prompt(doc_ids, summary_task(words, "paragraph", None), lengths.summary)
        out["tokens_out"] += self._generate(ids, lengths.summary)
        out["tokens_in"] += len(ids)
        out["read_tokens"] = min(len(doc_ids), len(ids))
        self.sync()
        t1 = time.perf_counter()
        for question, n in zip(questions, lengths.answers, strict=True):
            ids = self._prompt(doc_ids, qa_task(question), n)
            out["tokens_out"] += self._generate(ids, n)
            out["tokens_in"] += len(ids)
        self.sync()
        t2 = time.perf_counter()
        task = classify_task(labels)
        conts = [self.builder.label_ids(task, label) for label in labels]
        prefix = self._prompt(doc_ids, task, max(len(c) for c in conts))
        scores = [self._label_logprob(prefix, c) for c in conts]
        out["tokens_in"] += sum(len(prefix) + len(c) for c in conts)
        out["label"] = labels[max(range(len(labels)), key=scores.__getitem__)]
        self.sync()
        t3 = time.perf_counter()
        out.update(summarize_s=round(t1 - t0, 3), qa_s=round(t2 - t1, 3), classify_s=round(t3 - t2, 3),
                   total_s=round(t3 - t0, 3))
        return out
