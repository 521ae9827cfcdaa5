"""Generation: chunked prefill per prompt (prefill.py: bounded activations, last-position logits), then
one decode step per token for all prompts together, each at its own length."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from pipeline.engine.cache import KVCache
from pipeline.engine.graphs import CudaGraphStep, Pick, StaticDecodeStep, run_token_loop
from pipeline.engine.model import Mpt
from pipeline.engine.prefill import DEFAULT_CHUNK, prefill_chunked
from pipeline.engine.sampling import SamplingParams, select_next
from pipeline.engine.stream import Completion, TokenStream
from pipeline.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_LEN_MULTIPLE = 1024

DecodeMode = Literal["eager", "graph", "compile"]
DECODE_MODES: tuple[str, ...] = ("eager", "graph", "compile")
# decode kernels that read tensors back to the host (per-row Python loops): nothing to capture
HOST_SYNC_DECODE = frozenset({"blockwise"})


def resolve_decode_mode(requested: str | None, device: torch.device, decode_backend: str | None) -> DecodeMode:
    """How the decode step runs. Default: "graph" (the eager step replayed from one CUDA graph) on CUDA,
    "eager" on CPU or when the decode kernel syncs with the host. An explicit "graph" that cannot run
    is refused (ValueError), not silently downgraded: whoever asked for it is measuring or relying on it.
    "compile" is torch.compile(mode="reduce-overhead"), kept for comparison: it copies the KV cache
    every step (bench/NOTES.md)."""
    if requested is not None and requested not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, not {requested!r}")
    host_sync = decode_backend in HOST_SYNC_DECODE
    if requested is None:
        if device.type != "cuda":
            return "eager"
        if host_sync:
            log.info("decode backend %s syncs with the host: decoding eagerly, not from a CUDA graph",
                     decode_backend)
            return "eager"
        return "graph"
    if requested == "graph":
        if device.type != "cuda":
            raise ValueError(f"decode_mode='graph' needs a CUDA model (CUDA graphs); this one is on {device}: "
                             "use 'eager'")
        if host_sync:
            raise ValueError(f"decode_mode='graph' cannot capture the {decode_backend} decode kernel "
                             "(it syncs with the host): use 'eager'")
    return requested  # type: ignore[return-value]


class DenseGenerator:
    """One synchronous batch on a dense cache, each prompt prefilled from scratch: the reference the
    serving engine is tested against (each request run alone), and the benchmarks' baseline. Holds a
    model + tokenizer and how its decode step runs (`decode_mode`, see resolve_decode_mode)."""

    def __init__(
        self, model: Mpt, tokenizer: Tokenizer, *, chunk_size: int = DEFAULT_CHUNK, decode_mode: str | None = None
    ) -> None:
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        backend = model.backend
        self.decode_mode = resolve_decode_mode(decode_mode, model.device,
                                               backend.decode_name if backend is not None else None)
        self._compiled: Callable[..., torch.Tensor] | None = None
        if self.decode_mode == "compile":
            # fullgraph unless the decode kernel syncs with the host, as the blockwise one does
            fullgraph = backend is not None and backend.decode_name not in HOST_SYNC_DECODE
            self._compiled = torch.compile(model.decode, mode="reduce-overhead", fullgraph=fullgraph)

    @classmethod
    def load(
        cls,
        spec: str | Path,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        decode_mode: str | None = None,
    ) -> DenseGenerator:
        """Model + tokenizer from a checkpoint dir or hub id (bf16 on CUDA, float32 elsewhere by default)."""
        from pipeline.engine.load import load

        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, tokenizer = load(spec, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return cls(model, tokenizer, chunk_size=chunk_size, decode_mode=decode_mode)

    def score(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Summed log-probability of each continuation after `prefix` (see pipeline.engine.score)."""
        from pipeline.engine.score import score

        return score(self.model, prefix, continuations, chunk_size=self.chunk_size)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache of exactly `max_len` positions: SDPA decode reads every position it is given (masking
        the unused ones), so spare length is paid for on every step. Only the compiled step rounds up,
        to limit recompiles per distinct cache shape."""
        if self.decode_mode == "compile":
            max_len = -(-max_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
        cache = self.model.new_cache(batch, max_len)
        if self.decode_mode == "compile":
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        return cache

    def decode_step(self, cache: KVCache, *, pick: Pick | None = None, capture_pick: bool = False) -> StaticDecodeStep:
        """The decode step for `cache` in this generator's mode: called with (tokens [B], positions [B])
        it returns float32 logits [B, vocab] in a static buffer the next call overwrites; with `pick`
        it also runs the device-side token loop (`start` / `advance`, see graphs.py). In "graph" mode
        the graph is captured at the first run (one capture per cache, i.e. per generate call), the pick
        inside it when `capture_pick` (greedy: no RNG state to capture)."""
        if self.decode_mode == "graph":
            return CudaGraphStep(self.model, cache, pick=pick, capture_pick=capture_pick)
        decode = self._compiled if self._compiled is not None else self.model.decode
        return StaticDecodeStep(self.model, cache, decode=decode, pick=pick)

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

        def pick(step_logits: torch.Tensor) -> torch.Tensor:
            return select_next(step_logits, params, gens)

        streams = [TokenStream(self.tokenizer, params) for _ in lengths]

        def consume(tokens: list[int]) -> bool:
            for stream, tok in zip(streams, tokens, strict=True):
                stream.push(tok)
            return all(s.finish_reason for s in streams)

        step = self.decode_step(cache, pick=pick, capture_pick=params.is_greedy)
        positions = torch.tensor(list(lengths), dtype=torch.long, device=device)
        step.start(pick(logits), positions)
        run_token_loop(step, params.max_new_tokens, consume)
        return [s.completion(n) for s, n in zip(streams, lengths, strict=True)]
