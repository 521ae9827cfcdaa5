"""MPT-7B engine on one H200 vs HF transformers' MptForCausalLM, side by side, random bf16 weights.

Stages (JSON rewritten after each, so a crash keeps what ran):
  ceilings   bf16 matmul TFLOP/s and copy TB/s on this card
  attention  each CUDA attention backend vs float64 at small T (fresh random inputs)
  logits     full-model last-position logits, ours (fa4, flex) vs HF (bf16 and float32) on the same
             weights at T=2048, alibi_bias_max=8 (HF's only value)
  hf         HF prefill 16K (it OOMs at 32K) and decode 4K with use_cache=True
  prefill    ours at 16,384 and 65,536 tokens (StoryWriter slopes, bias max 16), chunk sizes, peak memory
  decode     ours, batch 1 at 4K and 65K context: the DenseGenerator's default step (eager step replayed from
             one CUDA graph), its tokens vs eager decode, and (--eager-decode, --compiled-decode) its
             eager and torch.compile steps
  layers     one attention layer at 16K / 65K: fa4 variants and tile options, flex, SDPA without ALiBi
then a table: ours, HF, ratio, roofline floor (FLOPs / 795 TFLOP/s, bytes / 4.27 TB/s), ours / floor.

H200:  PYTHONPATH=. python bench/engine.py --out $OUT
CPU:   PYTHONPATH=. python bench/engine.py --cpu-smoke   (tiny config, every code path but the kernels)
Decode only, 4K and 65K, no flash-attn-4 needed (FlexAttention prefill at 4K, random K/V at 65K), every
decode row side by side (before / token loop / fused norm / fused K/V write / split-K), ~1-2 minutes:
       PYTHONPATH=. python bench/engine.py --out $OUT --skip attention,layers,logits,prefill \
           --decode-contexts 4096,65536 --compiled-decode ""
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench import attention as attn_bench
from bench import hf_reference
from pipeline.engine import fused
from pipeline.engine.backends import fa4, sdpa, select_backend, splitk
from pipeline.engine.config import MptConfig, alibi_slopes
from pipeline.engine.generate import DenseGenerator
from pipeline.engine.graphs import run_token_loop
from pipeline.engine.model import Mpt
from pipeline.engine.prefill import prefill_chunked
from pipeline.engine.sampling import SamplingParams, select_next

log = logging.getLogger("bench.engine")
MATMUL_TFLOPS, COPY_TBPS = 795.0, 4.27
MPT_7B = {"d_model": 4096, "n_heads": 32, "n_layers": 32, "vocab_size": 50432}
TINY = {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 128}


class Bench:
    def __init__(self, out_dir: str, *, smoke: bool) -> None:
        self.out_dir, self.smoke = out_dir, smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.res: dict[str, Any] = {"smoke": smoke, "torch": torch.__version__}
        self.t0 = time.perf_counter()
        self.private: dict[str, Any] = {}  # objects handed between stages (never serialized)

    results_name = "engine.json"  # subclasses for other bench scripts name their own file

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        with open(os.path.join(self.out_dir, self.results_name), "w") as fh:
            json.dump(self.res, fh, indent=1, default=str)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("== stage %s (t=%.0fs)", name, time.perf_counter() - self.t0)
        try:
            self.res[name] = fn()
        except Exception as exc:
            traceback.print_exc()
            self.res[name] = {"error": repr(exc)[:1000]}
        self.save()
        print(name, json.dumps(self.res[name], default=str)[:3000], flush=True)
        return self.res[name]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, max_seq_len: int) -> Mpt:
        shape = TINY if self.smoke else MPT_7B
        config = MptConfig(**shape, max_seq_len=max_seq_len, alibi_bias_max=8, no_bias=True)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # parameters born in the target dtype (no fp32 copy)
        try:
            with torch.device("meta"):
                model = Mpt(config)
        finally:
            torch.set_default_dtype(default)
        model.to_empty(device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        model.reset_slopes(self.device)
        model.backend = select_backend(self.device)
        if model.backend.prefill_name == "fa4":
            try:  # a kernel that fails to JIT here must not sink every model stage: fall back to flex
                q = torch.randn(1, 256, config.n_heads, config.head_dim, device=self.device, dtype=self.dtype)
                model.backend.prefill(q, q, q, model.slopes, scale=config.scale)
            except Exception as exc:
                traceback.print_exc()
                self.res["fa4_fallback"] = repr(exc)[:500]
                model.backend = select_backend(self.device, "flex")
        self.res["backend"] = model.backend.name
        self.res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
        return model.eval()

    def tokens(self, n: int, vocab: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def ceilings(b: Bench) -> dict:
    n = 512 if b.smoke else 8192
    x = torch.randn(n, n, device=b.device, dtype=b.dtype)
    y = torch.randn_like(x)
    mm = time_median(b, lambda: x @ y, 10)
    src = torch.empty((1 << 20) if b.smoke else (2 << 30), dtype=torch.uint8, device=b.device)
    dst = torch.empty_like(src)
    cp = time_median(b, lambda: dst.copy_(src), 10)
    return {
        "matmul_tflops": round(2 * n**3 / mm / 1e12, 1),
        "copy_tbps": round(2 * src.numel() / cp / 1e12, 3),
    }


def time_median(b: Bench, fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    b.sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        b.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def logits_vs_hf(b: Bench, model: Mpt) -> dict:
    """Last 16 positions' logits at T=2048 (T=64 on CPU): ours per backend vs HF bf16 and HF float32."""
    t = 64 if b.smoke else 2048
    ids = torch.tensor(b.tokens(t, model.config.vocab_size), device=b.device)[None]
    hf = hf_reference.hf_model(model)
    hf32 = hf_reference.hf_model(model, dtype=torch.float64 if b.smoke else torch.float32)
    ref32 = hf_reference.last_logits(hf32, ids, 16)
    del hf32
    ref = hf_reference.last_logits(hf, ids, 16)
    out: dict[str, Any] = {"T": t, "hf_bf16_vs_hf_fp32": rel(ref, ref32)}
    # random weights leave near-ties among the top logits: HF's own bf16 shows how many flip by rounding
    out["hf_bf16_argmax_agree"] = float((ref.argmax(-1) == ref32.argmax(-1)).float().mean())
    names = ["blockwise"] if b.smoke else ["fa4", "flex"]
    saved = model.backend
    for name in names:
        try:
            model.backend = select_backend(b.device, name)
        except Exception as exc:
            out[name] = repr(exc)[:300]
            continue
        for chunk in (t, t // 4) if name != "flex" else (t,):  # flex recompiles per shape
            cache = model.new_cache(1, t)
            logits = None
            for s in range(0, t, chunk):
                logits = model.prefill(ids[:, s : s + chunk], cache, start=s, logits_from=-16)
            assert logits is not None
            out[f"{name}_chunk{chunk}_vs_hf_fp32"] = rel(logits, ref32)
            out[f"{name}_chunk{chunk}_vs_hf_bf16"] = rel(logits, ref)
            out[f"{name}_chunk{chunk}_argmax_agree"] = float(
                (logits.argmax(-1) == ref32.argmax(-1)).float().mean()
            )
    model.backend = saved
    b.private["hf"] = hf  # kept for the HF timing stage, dropped after
    return out


def hf_timings(b: Bench, model: Mpt) -> dict:
    hf = b.private.pop("hf")
    n_prefill, n_decode = (64, 32) if b.smoke else (16384, 4096)
    vocab = model.config.vocab_size
    out = {
        f"prefill_{n_prefill}": hf_reference.time_prefill(
            hf, torch.tensor(b.tokens(n_prefill, vocab), device=b.device)[None]
        ),
        f"decode_b1_{n_decode}": hf_reference.time_decode(
            hf, torch.tensor(b.tokens(n_decode, vocab), device=b.device)[None], 4 if b.smoke else 32
        ),
    }
    del hf
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# fa4 option sets the prefill stage can run side by side (--prefill-fa4); applied over fa4.DEFAULTS,
# except "kernels", applied over fused.KERNELS (the prefill's Triton LayerNorm / GELU, residual GEMMs)
UNFUSED_PREFILL = {"add_norm": False, "gelu": False, "residual_gemm": False}
PREFILL_FA4_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "unfused_ops": {"kernels": UNFUSED_PREFILL},  # run 9's default: torch LayerNorm / GELU / adds
    "no_residual_gemm": {"kernels": {"residual_gemm": False}},
    "dense": {"windows": False},
    "windows": {"windows": True},
    "fused": {"variant": "fused", "windows": False},
    "fused_windows": {"variant": "fused", "windows": True},
    "exp2_dense": {"variant": "exp2", "windows": False, "tile_mn": (128, 160)},  # the default before run 7
    "fused176": {"variant": "fused", "windows": False, "tile_mn": (128, 176)},
    "fused176_windows": {"variant": "fused", "windows": True, "tile_mn": (128, 176)},
}


def ours_prefill(
    b: Bench, model: Mpt, lengths: list[int], chunks: list[int], fa4_sets: list[str] | None = None,
    profile_len: int | None = None,
) -> dict:
    """Chunked prefill into a cache of T + 64 rows (room for decode); seconds, tok/s, FLOP/s, peak over
    weights + KV. With fa4 as the backend, each named fa4 option set runs in turn (keys get a suffix),
    and the first set's prefill at `profile_len` is profiled (top CUDA kernels)."""
    model.slopes = alibi_slopes(model.config.n_heads, 16, device=b.device)  # StoryWriter from here on
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out: dict[str, Any] = {}
    cache = None
    uses_fa4 = model.backend is not None and model.backend.prefill_name == "fa4"
    sets = (fa4_sets or ["default"]) if uses_fa4 else ["default"]
    saved = dict(fa4.DEFAULTS)
    for t in lengths:
        ids = b.tokens(t, model.config.vocab_size)
        cache = None  # free the previous length's cache before allocating this one
        cache = model.new_cache(1, t + 64)
        for chunk, set_name in [(c, s) for c in chunks for s in sets]:
            if chunk > t:
                continue
            options = dict(PREFILL_FA4_SETS[set_name])
            kernels = options.pop("kernels", {})
            fa4.DEFAULTS.clear()
            fa4.DEFAULTS.update({**saved, **options})
            suffix = "" if set_name == "default" else f"_{set_name}"
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            reps = 1 if t > 32768 else 3

            def run(ids: list[int] = ids, chunk: int = chunk, cache: Any = cache) -> Any:
                return prefill_chunked(model, ids, cache, chunk_size=chunk)

            try:
                with fused_kernels(**kernels):
                    sec = time_median(b, run, reps)
                    if t == profile_len and set_name == sets[0] and f"profile_{t}" not in out:
                        out[f"profile_{t}"] = top_kernels(b, run)
                        print(out[f"profile_{t}"], flush=True)
            except Exception as exc:  # OOM or a kernel failing to compile: record, go on
                traceback.print_exc()
                out[f"{t}_chunk{chunk}{suffix}"] = repr(exc)[:300]
                continue
            finally:
                del run  # its default argument would keep this cache alive into the next length
            entry: dict[str, Any] = {"s": round(sec, 4), "tok_s": round(t / sec)}
            flops = prefill_flops(model, t)
            entry["tflops"] = round(flops / sec / 1e12)
            entry["floor_s"] = round(flops / MATMUL_TFLOPS / 1e12, 4)
            if b.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated()
                entry.update(
                    peak_gb=round(peak / 1e9, 2),
                    weights_gb=round(weights / 1e9, 2),
                    kv_gb=round(cache.nbytes / 1e9, 2),
                    over_weights_kv_gb=round((peak - weights - cache.nbytes) / 1e9, 2),
                )
            out[f"{t}_chunk{chunk}{suffix}"] = entry
            print("ours prefill", t, chunk, set_name, entry, flush=True)
    fa4.DEFAULTS.clear()
    fa4.DEFAULTS.update(saved)
    if cache is not None:
        b.private["cache"] = (lengths[-1], cache)  # the longest prefilled cache feeds the 65K decode
    return out


def prefill_flops(model: Mpt, t: int) -> float:
    cfg = model.config
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "wte.weight")
    return 2 * linear * t + 2 * cfg.n_layers * cfg.d_model * t * t  # + causal QK and PV


GREEDY_STEPS = SamplingParams(max_new_tokens=16, greedy=True, stop_at_eos=False)


class _NoText:
    """Stands in for a tokenizer: the decode stages generate from token ids and never need text."""

    eos_token_id = None

    def decode(self, ids: list[int]) -> str:
        return ""


def generator_step(b: Bench, gen: DenseGenerator, cache: Any, ctx: int) -> tuple[Callable[[], None], float]:
    """`gen.decode_step(cache)` driven the way DenseGenerator._decode_loop drove it before the device-side
    loop: step, greedy pick, tokens to the host every step (its stop checks read them), positions + 1,
    tokens / positions copied back in. Setup = the first call (in "graph" mode: warm-up + CUDA-graph
    capture)."""
    step = gen.decode_step(cache)
    state = {
        "tokens": torch.zeros(1, dtype=torch.long, device=b.device),
        "positions": torch.full((1,), ctx, dtype=torch.long, device=b.device),
    }

    @torch.inference_mode()
    def run() -> None:
        logits = step(state["tokens"], state["positions"])
        state["tokens"] = select_next(logits, GREEDY_STEPS)
        state["tokens"].tolist()
        state["positions"] = state["positions"] + 1

    start = time.perf_counter()
    run()
    b.sync()
    return run, time.perf_counter() - start


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    return select_next(logits, GREEDY_STEPS)


def loop_step(b: Bench, gen: DenseGenerator, cache: Any, ctx: int, steps: int) -> tuple[Callable[[], None], float]:
    """The DenseGenerator's token loop as `_decode_loop` runs it now: greedy pick inside the CUDA graph,
    positions bumped on the device, tokens read back one step behind (run_token_loop). One run =
    `steps` decode steps (steps + 1 tokens, the first from the "prefill"); one capture for all runs."""
    step = gen.decode_step(cache, pick=greedy_pick, capture_pick=True)
    first = torch.zeros(1, dtype=torch.long, device=b.device)
    positions = torch.full((1,), ctx, dtype=torch.long, device=b.device)

    @torch.inference_mode()
    def run(n: int = steps) -> None:
        step.start(first, positions)
        run_token_loop(step, n + 1, lambda tokens: False)

    start = time.perf_counter()
    run(1)  # warm-up + capture
    b.sync()
    return run, time.perf_counter() - start


@contextlib.contextmanager
def decode_variant(
    model: Mpt, *, add_norm: bool, kv_write: bool, gemv: bool = True, attention: str | None = None
) -> Iterator[None]:
    """Run the decode step with the chosen fused kernels and decode attention ("sdpa", "splitk"; None:
    the selected backend's), restored after."""
    saved_backend = model.backend
    if attention is not None:
        assert saved_backend is not None
        kernel = {"splitk": splitk.decode, "sdpa": sdpa.decode}[attention]
        model.backend = dataclasses.replace(saved_backend, decode=kernel, decode_name=attention)
    try:
        with fused_kernels(add_norm=add_norm, kv_write=kv_write, gemv=gemv):
            yield
    finally:
        model.backend = saved_backend


@contextlib.contextmanager
def fused_kernels(**overrides: Any) -> Iterator[None]:
    """fused.KERNELS with `overrides` applied (in place: modules read it at each call), restored after."""
    saved = dataclasses.asdict(fused.KERNELS)
    for field, value in overrides.items():
        setattr(fused.KERNELS, field, value)
    try:
        yield
    finally:
        for field, value in saved.items():
            setattr(fused.KERNELS, field, value)


def attention_per_layer(b: Bench, model: Mpt, cache: Any, ctx: int) -> dict:
    """Decode attention alone over every layer's cache at this context: SDPA + bias row (bias rebuilt
    per layer, as under inference mode) vs the Triton split-K kernel; microseconds per layer. Inputs
    are the cache's own K/V, so both read exactly what the model's step reads."""
    cfg = model.config
    q = torch.randn(1, 1, cfg.n_heads, cfg.head_dim, device=b.device, dtype=model.dtype)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        lengths = torch.full((1,), ctx + 1, dtype=torch.long, device=b.device)  # inference tensor: no bias memo
        ref = sdpa.decode(q, *cache.layer(0), model.slopes, lengths, scale=cfg.scale)
        got = splitk.decode(q, *cache.layer(0), model.slopes, lengths, scale=cfg.scale)
        out["splitk_vs_sdpa_rel_err"] = rel(got, ref)
        for name, kernel in (("sdpa_bias_row", sdpa.decode), ("splitk", splitk.decode)):

            def layers(kernel: Callable[..., torch.Tensor] = kernel) -> None:
                for i in range(cfg.n_layers):
                    kernel(q, *cache.layer(i), model.slopes, lengths, scale=cfg.scale)

            sec = time_median(b, layers, 5, warmup=2)
            out[f"{name}_us_per_layer"] = round(sec / cfg.n_layers * 1e6, 1)
    kv_bytes = 2 * (ctx + 1) * cfg.d_model * 2
    out["floor_us_per_layer"] = round(kv_bytes / COPY_TBPS / 1e6, 1)
    return out


def compiled_step(b: Bench, gen: DenseGenerator, cache: Any, ctx: int) -> tuple[Callable[[], None], float]:
    """A DenseGenerator with decode_mode="compile": torch.compile(mode="reduce-overhead"), the old default."""
    torch._dynamo.mark_static_address(cache.k)
    torch._dynamo.mark_static_address(cache.v)
    return _greedy_steps(b, gen.decode_step(cache), ctx)


def _greedy_steps(
    b: Bench, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ctx: int
) -> tuple[Callable[[], None], float]:
    """One greedy decode step per call of the returned function, through step(token [1], position [1])
    -> logits, from position `ctx` on; plus the seconds its first three steps took (compile + capture)."""
    state = {"token": torch.zeros(1, dtype=torch.long, device=b.device), "i": 0}
    base = torch.full((1,), ctx, dtype=torch.long, device=b.device)

    def run() -> None:
        with torch.inference_mode():
            state["token"] = step(state["token"], base + state["i"]).argmax(-1)
        state["i"] += 1

    start = time.perf_counter()
    for _ in range(3):  # compile + graph capture
        run()
    b.sync()
    return run, time.perf_counter() - start


def decode_index_copy(model: Mpt, tokens: torch.Tensor, cache: Any, positions: torch.Tensor) -> torch.Tensor:
    """Mpt.decode with one change, as an experiment for the engine: each layer's new K/V is written with
    index_copy_ into the flattened base cache tensor instead of `k_cache[rows, positions] = k` on a
    per-layer view. Under torch.compile the view mutation is functionalized into copies of the whole
    cache every step (profile in NOTES.md); index_copy_ on the graph input is done in place."""
    cfg, backend = model.config, model._backend()
    x = model.wte(tokens)[:, None]  # [B] -> [B, 1, d_model]
    rows = torch.arange(x.shape[0], device=x.device)
    n_rows, max_len = cache.k.shape[1], cache.k.shape[2]
    flat_k = cache.k.view(-1, cfg.n_heads, cfg.head_dim)  # [n_layers * B * L_max, H, D]
    flat_v = cache.v.view(-1, cfg.n_heads, cfg.head_dim)
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.project(block.norm_1(x))
        slot = (i * n_rows + rows) * max_len + positions  # [B] flat row of (layer i, row b, position)
        flat_k.index_copy_(0, slot, k[:, 0])
        flat_v.index_copy_(0, slot, v[:, 0])
        k_cache, v_cache = cache.layer(i)
        a = backend.decode(q, k_cache, v_cache, model.slopes, positions + 1, scale=cfg.scale)
        x = x + block.attn.output(a)
        x = x + block.ffn(block.norm_2(x))
    return model.logits(x[:, 0])


def compiled_index_copy_step(b: Bench, model: Mpt, cache: Any, ctx: int) -> tuple[Callable[[], None], float]:
    step_fn = b.private.get("index_copy_step")
    if step_fn is None:
        step_fn = torch.compile(decode_index_copy, mode="reduce-overhead", fullgraph=True)
        b.private["index_copy_step"] = step_fn
    return _greedy_steps(b, lambda token, position: step_fn(model, token, cache, position), ctx)


def top_kernels(b: Bench, step: Callable[[], None]) -> str:
    if b.device.type != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        b.sync()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)


PROFILE_STEPS = 4


def ours_decode(
    b: Bench,
    model: Mpt,
    contexts: list[int],
    steps: int,
    compiled_contexts: list[int],
    index_copy_contexts: list[int] = (),  # type: ignore[assignment]
    eager_contexts: list[int] = (),  # type: ignore[assignment]
    split_k_contexts: list[int] = (),  # type: ignore[assignment]
) -> dict:
    """ms/token at batch 1, into a cache of exactly ctx + 64 positions as the DenseGenerator sizes it, rows
    side by side (each its own capture; a failing row prints its traceback and the rest go on):
      graph_before  the step as it was: unfused kernels, host round trip every step (generator_step)
      graph_loop    + device-side token loop (pick in graph, positions on device, tokens read back one
                    step behind): item 1 alone
      graph_norm    + fused residual add + LayerNorm
      no_gemv       + one-kernel K/V cache write (run 9's default); these four attend with SDPA
      generator     + each projection one fused GEMV kernel (LayerNorm / GELU / residual add inside:
                    pipeline/engine/gemv.py), split-K attention = the DenseGenerator's default (goal row)
      sdpa          generator with SDPA + bias row attention instead of split-K
    plus `eager` (decode_mode="eager", old driver), `compiled` / `compiled_index_copy` (experiments),
    and attention alone per layer (SDPA + bias row vs split-K) for split-K contexts. At the first
    context: greedy tokens of the default vs eager, unfused and split-K, and a profile of the new
    step. Contexts above 8K skip the prefill (random K/V: decode time does not depend on values).
    Floor: weights + K/V of `ctx` tokens read once at 4.27 TB/s."""
    gen = DenseGenerator(model, _NoText())  # type: ignore[arg-type]
    compiled_gen = DenseGenerator(model, _NoText(), decode_mode="compile") if compiled_contexts else None  # type: ignore[arg-type]
    eager_gen = DenseGenerator(model, _NoText(), decode_mode="eager")  # type: ignore[arg-type]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prefilled = b.private.pop("cache", None)
    out: dict[str, Any] = {"default_mode": gen.decode_mode}
    graph = gen.decode_mode == "graph"
    for ctx in contexts:
        ids = b.tokens(ctx, model.config.vocab_size)
        if ctx == contexts[0]:
            out["tokens"] = token_checks(gen, ids, splitk_too=bool(split_k_contexts))
            print("ours decode tokens", out["tokens"], flush=True)
        if prefilled is not None and prefilled[0] == ctx:
            cache = prefilled[1]  # K/V of a real 65K prefill, room for 64 more
        else:
            cache = gen.new_cache(1, ctx + 64)
            if ctx <= 8192 or b.smoke:
                prefill_chunked(model, ids, cache, chunk_size=min(ctx, 8192))
            else:
                cache.k.normal_()
                cache.v.normal_()
        kv_bytes = 2 * model.config.n_layers * ctx * model.config.d_model * 2  # K and V once, bf16
        entry: dict[str, Any] = {
            "floor_ms": round((weights + kv_bytes) / COPY_TBPS / 1e9, 3),
            "cache_len": cache.max_len,
        }
        unfused = {"add_norm": False, "kv_write": False, "gemv": False, "attention": "sdpa"}
        fused_all = {"add_norm": True, "kv_write": True}
        rows: list[tuple[str, dict, Callable[[], tuple[Callable[..., None], float]], bool]] = []
        if graph:
            rows += [
                ("graph_before", unfused, lambda cache=cache, ctx=ctx: generator_step(b, gen, cache, ctx), False),
                ("graph_loop", unfused, lambda cache=cache, ctx=ctx: loop_step(b, gen, cache, ctx, steps), True),
                ("graph_norm", {"add_norm": True, "kv_write": False, "gemv": False, "attention": "sdpa"},
                 lambda cache=cache, ctx=ctx: loop_step(b, gen, cache, ctx, steps), True),
                ("no_gemv", {**fused_all, "gemv": False, "attention": "sdpa"},
                 lambda cache=cache, ctx=ctx: loop_step(b, gen, cache, ctx, steps), True),
            ]
        rows.append(("generator", fused_all, lambda cache=cache, ctx=ctx: loop_step(b, gen, cache, ctx, steps), True))
        if ctx in split_k_contexts:
            rows.append(("sdpa", {**fused_all, "attention": "sdpa"},
                         lambda cache=cache, ctx=ctx: loop_step(b, gen, cache, ctx, steps), True))
        if ctx in eager_contexts and graph:
            rows.append(("eager", fused_all, lambda cache=cache, ctx=ctx: generator_step(b, eager_gen, cache, ctx),
                         False))
        if compiled_gen is not None and ctx in compiled_contexts:
            rows.append(("compiled", unfused, lambda cache=cache, ctx=ctx: compiled_step(b, compiled_gen, cache, ctx),
                         False))
        if ctx in index_copy_contexts:
            rows.append(("compiled_index_copy", unfused,
                         lambda cache=cache, ctx=ctx: compiled_index_copy_step(b, model, cache, ctx), False))
        for mode, variant, make, whole_loop in rows:
            try:
                with decode_variant(model, **variant):
                    time_row(b, entry, mode, make, whole_loop, steps, profile=ctx == contexts[0])
            except Exception as exc:
                traceback.print_exc()
                entry[f"{mode}_error"] = repr(exc)[:500]
        if ctx in split_k_contexts:
            try:
                entry["attention"] = attention_per_layer(b, model, cache, ctx)
            except Exception as exc:
                traceback.print_exc()
                entry["attention"] = {"error": repr(exc)[:500]}
        if "generator_ms_per_token" in entry:  # the goal row: what generate() runs, not the best variant
            entry["ms_per_token"] = entry["generator_ms_per_token"]
        out[str(ctx)] = entry
        print(
            "ours decode", ctx, {k: v for k, v in entry.items() if not k.endswith("_top_kernels")}, flush=True
        )
        cache = prefilled = None
    return out


def time_row(
    b: Bench, entry: dict, mode: str, make: Callable[[], tuple[Callable[..., None], float]], whole_loop: bool,
    steps: int, *, profile: bool,
) -> None:
    """ms/token of one row into `entry`. A whole-loop row's run() decodes `steps` tokens (the
    pipelined loop has to run to show its overlap); a per-step row's run() decodes one."""
    step, setup_s = make()
    if whole_loop:
        step()
        b.sync()
        start = time.perf_counter()
        step()
    else:
        step()
        b.sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
    b.sync()
    entry[f"{mode}_ms_per_token"] = round((time.perf_counter() - start) / steps * 1e3, 3)
    entry[f"{mode}_setup_s"] = round(setup_s, 1)
    if profile and mode in ("no_gemv", "generator", "sdpa"):
        if whole_loop:
            table_text = top_kernels(b, lambda: step(PROFILE_STEPS))
        else:
            table_text = top_kernels(b, lambda: [step() for _ in range(PROFILE_STEPS)])  # type: ignore[func-returns-value]
        entry[f"{mode}_top_kernels"] = table_text
        print(f"top kernels, {mode}, {PROFILE_STEPS} decode steps:", flush=True)
        print(table_text, flush=True)


def token_checks(gen: DenseGenerator, ids: list[int], *, splitk_too: bool) -> dict:
    """Greedy tokens (16 steps) of the default decode vs eager (must be equal: same kernels, replayed),
    and of the unfused kernels / split-K attention vs the default (bf16 rounding may legitimately
    differ; reported, not asserted)."""
    out: dict[str, Any] = {}
    checks: list[tuple[str, dict]] = [("vs_eager", {"add_norm": True, "kv_write": True})]
    checks.append(("unfused_vs_default", {"add_norm": False, "kv_write": False, "gemv": False, "attention": "sdpa"}))
    if splitk_too:
        checks.append(("sdpa_vs_default", {"add_norm": True, "kv_write": True, "attention": "sdpa"}))
    try:
        default = DenseGenerator(gen.model, _NoText())  # type: ignore[arg-type]
        (want,) = default.generate_ids([ids], GREEDY_STEPS)
        out["mode"] = default.decode_mode
    except Exception as exc:
        traceback.print_exc()
        return {"error": repr(exc)[:500]}
    for name, variant in checks:
        try:
            with decode_variant(gen.model, **variant):
                mode = "eager" if name == "vs_eager" else None
                (got,) = DenseGenerator(gen.model, _NoText(), decode_mode=mode).generate_ids([ids], GREEDY_STEPS)  # type: ignore[arg-type]
            out[f"tokens_{name}"] = got.tokens == want.tokens
            if got.tokens != want.tokens:
                out[f"first_difference_{name}"] = next(
                    i for i, (x, y) in enumerate(zip(got.tokens, want.tokens, strict=True)) if x != y
                )
        except Exception as exc:
            traceback.print_exc()
            out[f"{name}_error"] = repr(exc)[:500]
    return out


def attention_layers(b: Bench, budget_s: float) -> dict:
    slopes = alibi_slopes(32, 16, device=b.device)
    kernels = attn_bench.prefill_kernels(slopes, 1.0 / math.sqrt(128), quick=False)
    layers = attn_bench.time_prefill(kernels, [16384, 65536], budget_s)
    best = attn_bench.best_fa4_config(layers)
    if best is not None:  # the model stages run with the fastest exact fa4 configuration
        fa4.DEFAULTS.update({k: v for k, v in best[1].items() if k != "windows"})  # windows stay on
        b.res["fa4_config_used"] = {"name": best[0], **fa4.DEFAULTS}
    return layers


def attention_checks(b: Bench) -> dict:
    slopes = alibi_slopes(32, 16, device=b.device)
    scale = 1.0 / math.sqrt(128)
    kernels = attn_bench.prefill_kernels(slopes, scale, quick=True)
    return {
        "prefill": attn_bench.check_prefill(kernels, slopes, scale),
        "decode": attn_bench.check_and_time_decode(slopes, scale),
    }


def table(res: dict) -> str:
    """ours, HF, ratio, floor, ours/floor for the goal rows."""
    rows = []
    hf = res.get("hf", {}) if isinstance(res.get("hf"), dict) else {}
    pre = res.get("prefill", {}) if isinstance(res.get("prefill"), dict) else {}
    dec = res.get("decode", {}) if isinstance(res.get("decode"), dict) else {}

    def best(t: int) -> dict | None:
        runs = [v for k, v in pre.items() if k.startswith(f"{t}_") and isinstance(v, dict)]
        return min(runs, key=lambda v: v["s"]) if runs else None

    for t, goal in ((16384, 0.42), (65536, 3.0)):
        ours = best(t)
        theirs = hf.get(f"prefill_{t}", {}).get("s") if t == 16384 else "OOM (anchor: 32K)"
        if ours:
            ratio = f"{theirs / ours['s']:.1f}x" if isinstance(theirs, float) else "-"
            rows.append(
                f"prefill {t:>6} tok | {ours['s']:.3f} s | {theirs} | {ratio} | {ours['floor_s']:.3f} s | "
                f"{ours['s'] / ours['floor_s']:.2f} | goal <= {goal} s | peak {ours.get('peak_gb')} GB "
                f"(+{ours.get('over_weights_kv_gb')} over weights+KV)"
            )
    for ctx, goal in (("4096", 4.5), ("65536", 13.5)):
        ours = dec.get(ctx)
        theirs = hf.get(f"decode_b1_{ctx}", {}).get("ms_per_token", "-") if ctx == "4096" else "-"
        if isinstance(ours, dict) and "ms_per_token" in ours:
            ratio = f"{theirs / ours['ms_per_token']:.1f}x" if isinstance(theirs, float) else "-"
            rows.append(
                f"decode b1 @{ctx:>6} (DenseGenerator, {dec.get('default_mode')}) | {ours['ms_per_token']:.2f} ms | "
                f"{theirs} | {ratio} | {ours['floor_ms']:.2f} ms | {ours['ms_per_token'] / ours['floor_ms']:.2f} | "
                f"goal <= {goal} ms"
            )
        for row, label in (("graph_before", "graph, before: unfused, host round trip"),
                           ("graph_loop", "graph + device token loop"),
                           ("graph_norm", "graph + loop + fused add+norm"),
                           ("no_gemv", "+ one-kernel K/V write: run 9's default"),
                           ("sdpa", "default with SDPA + bias row attention")):
            if isinstance(ours, dict) and f"{row}_ms_per_token" in ours:
                rows.append(f"decode b1 @{ctx:>6} ({label}) | {ours[f'{row}_ms_per_token']:.2f} ms | | | "
                            f"{ours['floor_ms']:.2f} ms | {ours[f'{row}_ms_per_token'] / ours['floor_ms']:.2f} | -")
        if isinstance(ours, dict) and "eager_ms_per_token" in ours:
            rows.append(f"decode b1 @{ctx:>6} (DenseGenerator, eager) | {ours['eager_ms_per_token']:.2f} ms | | | | | -")
        if isinstance(ours, dict) and "compiled_ms_per_token" in ours:
            rows.append(f"decode b1 @{ctx:>6} (DenseGenerator, compile: old default) | "
                        f"{ours['compiled_ms_per_token']:.2f} ms | | | | | -")
    head = "what | ours | HF | HF/ours | floor | ours/floor | goal"
    return "\n".join([head, *rows])


def model_stages(b: Bench, args: argparse.Namespace, skip: set[str]) -> None:
    """Every stage that needs the full model; it is freed when this returns."""
    model = b.build_model(max_seq_len=65536 + 64)
    if "logits" not in skip:
        b.stage("logits", lambda: logits_vs_hf(b, model))
    if "hf" not in skip and "hf" in b.private:
        b.stage("hf", lambda: hf_timings(b, model))
    b.private.pop("hf", None)
    lengths = [48, 96] if b.smoke else [16384, 65536]
    chunks = [32, 16] if b.smoke else [int(c) for c in args.chunks.split(",")]
    contexts = [32, 96] if b.smoke else [int(c) for c in args.decode_contexts.split(",") if c]
    if "prefill" not in skip:
        sets = [x for x in args.prefill_fa4.split(",") if x] if not b.smoke else None
        profile_len = args.profile_prefill if not b.smoke else None
        b.stage("prefill", lambda: ours_prefill(b, model, lengths, chunks, sets, profile_len))
    if "decode" not in skip:
        compiled = [int(c) for c in args.compiled_decode.split(",") if c] if not b.smoke else []
        fixed = [int(c) for c in args.index_copy_decode.split(",") if c] if not b.smoke else []
        eager = [int(c) for c in args.eager_decode.split(",") if c] if not b.smoke else []
        split_k = [int(c) for c in args.split_k_decode.split(",") if c] if not b.smoke else []
        b.stage("decode", lambda: ours_decode(b, model, contexts, 4 if b.smoke else 32, compiled, fixed, eager,
                                              split_k))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of stages to skip")
    parser.add_argument("--chunks", default="16384,8192")
    parser.add_argument("--layers-budget-s", type=float, default=240.0)
    parser.add_argument(
        "--prefill-fa4", default="default", help=f"fa4 option sets for the prefill stage: {list(PREFILL_FA4_SETS)}"
    )
    parser.add_argument("--profile-prefill", type=int, default=0, help="profile the prefill of this length")
    parser.add_argument("--decode-contexts", default="4096,65536", help="contexts of the decode stage")
    parser.add_argument(
        "--compiled-decode", default="4096", help="contexts that also time the decode_mode='compile' step"
    )
    parser.add_argument(
        "--eager-decode", default="4096", help="contexts that also time the decode_mode='eager' step"
    )
    parser.add_argument(
        "--split-k-decode", default="4096,65536",
        help="contexts that also time the Triton split-K decode attention (model row + attention alone)",
    )
    parser.add_argument(
        "--index-copy-decode", default="", help="contexts that time the compiled step with index_copy_ writes"
    )
    parser.add_argument("--layers-first", action="store_true", help="time attention layers before the model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    b = Bench(args.out, smoke=args.cpu_smoke)
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    if b.device.type == "cuda":
        b.res["device"] = torch.cuda.get_device_name()
    b.stage("ceilings", lambda: ceilings(b))
    if not b.smoke and "attention" not in skip:
        b.stage("attention", lambda: attention_checks(b))
    run_layers = not b.smoke and "layers" not in skip
    if run_layers and args.layers_first:
        b.stage("layers", lambda: attention_layers(b, args.layers_budget_s))
    model_stages(b, args, skip)
    b.private.clear()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    if run_layers and not args.layers_first:
        b.stage("layers", lambda: attention_layers(b, args.layers_budget_s))
    b.res["table"] = table(b.res)
    b.save()
    print("\n" + b.res["table"])
    if "layers" in b.res and isinstance(b.res["layers"], dict) and "error" not in b.res["layers"]:
        attn_bench.print_table({"prefill": b.res["layers"], "decode": {}, "check": {}})


if __name__ == "__main__":
    main()
