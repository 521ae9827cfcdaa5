"""Generation: chunked prefill per prompt (bounded activations, last-position logits), then one decode
step per token for all prompts together, each at its own length."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.engine.cache import KVCache
from pipeline.engine.model import Mpt
from pipeline.engine.sampling import SamplingParams, select_next
from pipeline.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048
CACHE_LEN_MULTIPLE = 1024


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int


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


class Generator:
    """Holds a model + tokenizer and a (optionally compiled) decode step."""

    def __init__(
        self, model: Mpt, tokenizer: Tokenizer, *, chunk_size: int = DEFAULT_CHUNK, compile: bool | None = None
    ) -> None:
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.compiled = model.device.type == "cuda" if compile is None else compile
        self._decode: Callable[..., torch.Tensor] = model.decode
        if self.compiled:
            # CUDA graphs replay the step without per-kernel launch cost; the cache is marked static below
            # (fullgraph unless the decode kernel syncs with the host, as the blockwise one does)
            backend = model.backend
            fullgraph = backend is not None and backend.decode_name != "blockwise"
            self._decode = torch.compile(model.decode, mode="reduce-overhead", fullgraph=fullgraph)

    @classmethod
    def load(
        cls,
        spec: str | Path,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        compile: bool | None = None,
    ) -> Generator:
        """Model + tokenizer from a checkpoint dir or hub id (bf16 on CUDA, float32 elsewhere by default)."""
        from pipeline.engine.load import load

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, tokenizer = load(spec, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return cls(model, tokenizer, chunk_size=chunk_size, compile=compile)

    def score(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Summed log-probability of each continuation after `prefix` (see pipeline.engine.score)."""
        from pipeline.engine.score import score

        return score(self.model, prefix, continuations, chunk_size=self.chunk_size)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.compiled:  # round up so the compiled step sees few distinct cache shapes (recompiles)
            max_len = -(-max_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
        cache = self.model.new_cache(batch, max_len)
        if self.compiled:
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        return cache

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self.generate_ids(ids, params)

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise ValueError(f"prompt {[len(p) for p in prompts].index(0)} is empty")
        self._check_lengths([len(p) for p in prompts], params)
        cache = self.new_cache(len(prompts), max(len(p) for p in prompts) + params.max_new_tokens)
        logits = torch.stack([
            prefill_chunked(self.model, p, cache, row=r, chunk_size=self.chunk_size) for r, p in enumerate(prompts)
        ])  # [B, V]
        return self._decode_loop(cache, logits, [len(p) for p in prompts], params)

    @torch.inference_mode()
    def generate_from_prefix(
        self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """Several prompts that share one document prefix: the prefix is prefilled once, its K/V forked
        into one cache row per suffix, then each suffix is prefilled on top and all decode together.
        (The fork copies the prefix; a paged cache will share it instead.)"""
        if not prefix or not suffixes or any(not s for s in suffixes):
            raise ValueError("generate_from_prefix needs a non-empty prefix and non-empty suffixes")
        p = len(prefix)
        lengths = [p + len(s) for s in suffixes]
        self._check_lengths(lengths, params)
        cache = self.new_cache(len(suffixes), max(lengths) + params.max_new_tokens)
        prefill_chunked(self.model, prefix, cache, row=0, chunk_size=self.chunk_size)
        cache.fork(0, range(1, len(suffixes)), p)
        logits = torch.stack([
            prefill_chunked(self.model, s, cache, row=r, start=p, chunk_size=self.chunk_size)
            for r, s in enumerate(suffixes)
        ])  # [B, V]
        return self._decode_loop(cache, logits, lengths, params)

    def _check_lengths(self, lengths: Sequence[int], params: SamplingParams) -> None:
        limit = self.model.config.max_seq_len
        for i, n in enumerate(lengths):
            if n + params.max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {n} tokens; with max_new_tokens={params.max_new_tokens} it exceeds "
                    f"max_seq_len={limit} (load the model with a larger max_seq_len)"
                )

    def _decode_loop(
        self, cache: KVCache, logits: torch.Tensor, lengths: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        """Sample from logits [B, V], then one decode step per token for all rows at their own lengths."""
        device = self.model.device
        gens = None
        if params.seed is not None and not params.is_greedy:  # one RNG per row: batch-independent samples
            gens = [torch.Generator(device=device).manual_seed(params.seed) for _ in lengths]
        positions = torch.tensor(list(lengths), dtype=torch.long, device=device)
        streams = [_Stream(self.tokenizer, params) for _ in lengths]
        for step in range(params.max_new_tokens):
            next_tokens = select_next(logits, params, gens)
            for stream, tok in zip(streams, next_tokens.tolist(), strict=True):
                stream.push(tok)
            if all(s.finish_reason for s in streams) or step == params.max_new_tokens - 1:
                break
            logits = self._decode(next_tokens, cache, positions)
            positions = positions + 1
        return [s.completion(n) for s, n in zip(streams, lengths, strict=True)]


class _Stream:
    """One sequence's generated tokens, with end-of-text and stop-string detection."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = ""

    def push(self, token: int) -> None:
        if self.finish_reason:
            return
        if self.params.stop_at_eos and token == self.tokenizer.eos_token_id:
            self.finish_reason = "eos"
            return
        self.tokens.append(token)
        if self.params.stop:
            text = self.tokenizer.decode(self.tokens)
            hits = [i for s in self.params.stop if (i := text.find(s)) >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.finish_reason = "stop"
        if not self.finish_reason and len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"

    def completion(self, prompt_tokens: int) -> Completion:
        text = self.text if self.finish_reason == "stop" else self.tokenizer.decode(self.tokens)
        return Completion(text=text, tokens=self.tokens, finish_reason=self.finish_reason or "length",
                          prompt_tokens=prompt_tokens)
