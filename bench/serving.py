"""The serving engine on one H200 (MPT-7B shape, random bf16 weights, prompts from the real MPT
tokenizer) against today's single-batch path (DenseGenerator) in the same run.

Stages (JSON rewritten after each):
  check      greedy tokens of shared-prefix requests through the engine vs each run alone (dense)
  document   one 32K-token document + 6 continuations (one of 256 tokens, five of 64) vs the same
             document's prefill + 256 greedy steps alone; KV memory used vs one document's; the same
             on another document with synchronous steps (EngineConfig.async_scheduling off)
  group      8 requests sharing one 32K prefix decoding together: step time vs one request's step
  batch32    32 sequences of 4K context decoding together: tokens/s vs the bandwidth floor
  stream     documents of 2K-60K tokens arriving at random, 3-5 tasks each: documents/hour, busy
             fraction, time to first token, vs the same stream one request at a time (dense)
  regress    65,536-token prefill and batch-1 decode at 4K through the engine (async and synchronous
             steps), and the dense path's graph-decode step at 4K (same run)
  profile    batch-1 decode at 4K kernel by kernel, engine vs dense (bench/decode_profile.py)

H200:  PYTHONPATH=. python bench/serving.py --out $OUT --tokenizer .tok
CPU:   PYTHONPATH=. python bench/serving.py --cpu-smoke --tokenizer ../shared/tokenizers/gpt-neox-20b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import torch

from bench.engine import COPY_TBPS, Bench
from pipeline.engine.core.requests import GenerateRequest, SamplingParams, ScoreRequest
from pipeline.engine.generate import DenseGenerator
from pipeline.engine.paged_cache import bytes_per_token
from pipeline.engine.prefill import prefill_chunked
from pipeline.engine.score import score
from pipeline.engine.serving import EngineConfig, ServingEngine
from pipeline.engine.tokenizer import Tokenizer

log = logging.getLogger("bench.serving")
WEIGHT_BYTES = 13.3e9


class ServingBench(Bench):
    results_name = "serving.json"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)


class Corpus:
    """Token ids of real text (this repository's docs and code, tokenized by MPT's tokenizer), cut into
    documents of any length; each document and task differ so nothing is shared by accident."""

    def __init__(self, tokenizer: Tokenizer, vocab: int) -> None:
        text = "\n\n".join(p.read_text(errors="ignore") for p in sorted(Path(".").glob("**/*.md"))[:60])
        text += "\n\n".join(p.read_text(errors="ignore") for p in sorted(Path("pipeline").glob("**/*.py")))
        self.ids = [i % vocab for i in tokenizer.encode(text)]
        self.tokenizer, self.vocab = tokenizer, vocab
        self.rng = random.Random(0)

    def doc(self, n: int) -> list[int]:
        start = self.rng.randrange(0, max(1, len(self.ids) - 1))
        out: list[int] = []
        while len(out) < n:
            out += self.ids[start : start + n - len(out)]
            start = 0
        return out

    def task(self, i: int) -> list[int]:
        text = f"\n\n### Task {i}: answer question {i} about the document above.\n"
        return [t % self.vocab for t in self.tokenizer.encode(text)]


def engine(b: Bench, model, tokenizer) -> ServingEngine:
    """One engine for every stage: its pool is capped so the dense baseline's own cache (up to 60K
    tokens, 30 GiB) fits beside it on the card."""
    cap = (72 << 30) if b.device.type == "cuda" else (1 << 28)
    return ServingEngine(model, tokenizer, EngineConfig(kv_cache_bytes=cap), start_thread=False)


def run(eng: ServingEngine, requests: list[GenerateRequest]) -> tuple[list[Any], float]:
    b0 = time.perf_counter()
    futs = [eng.submit(r) for r in requests]
    eng.run_until_idle()
    return [f.result() for f in futs], time.perf_counter() - b0


def check(b: Bench, eng: ServingEngine, corpus: Corpus, dense: DenseGenerator) -> dict:
    n = 256 if b.smoke else 8192
    doc = corpus.doc(n)
    prompts = [doc + corpus.task(i) for i in range(4)]
    results, _ = run(eng, [GenerateRequest(prompt_ids=p, params=greedy(16)) for p in prompts])
    alone = [dense.generate_ids([p], greedy(16))[0].tokens for p in prompts]
    agree = [sum(x == y for x, y in zip(r.tokens, a, strict=True)) / 16 for r, a in zip(results, alone, strict=True)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(r.tokens, a, strict=True)) if x != y), 16)
                  for r, a in zip(results, alone, strict=True)]
    # where the two paths first pick differently, how far apart the two picks are in log p (each path's
    # own): near-ties of random bf16 weights come out at a few hundredths of a nat, a wrong kernel at more
    gaps: list[dict | None] = []
    for p, r, a, i in zip(prompts, results, alone, first_diff, strict=True):
        if i >= 16:
            gaps.append(None)
            continue
        prefix, picks = p + a[:i], [[r.tokens[i]], [a[i]]]
        ours = eng.submit(ScoreRequest(prefix_ids=prefix, continuations=picks))
        eng.run_until_idle()
        theirs = score(dense.model, prefix, picks)
        gaps.append({"ours_nats": round(abs(ours.result().logprobs[0] - ours.result().logprobs[1]), 4),
                     "dense_nats": round(abs(theirs[0] - theirs[1]), 4)})
    return {"doc_tokens": n, "token_agreement": agree, "first_divergence": first_diff,
            "divergence_gap": gaps, "cached_tokens": [r.cached_tokens for r in results]}


def document(b: Bench, eng: ServingEngine, corpus: Corpus, dense: DenseGenerator) -> dict:
    model = eng.model
    n = 512 if b.smoke else 32768
    doc = corpus.doc(n)
    lengths = [256, 64, 64, 64, 64, 64]
    run(eng, [GenerateRequest(prompt_ids=corpus.doc(300), params=greedy(4))])  # warm-up: graphs, kernels
    peak = 0

    def watch(_: int) -> None:
        nonlocal peak
        peak = max(peak, eng.scheduler.stats()["blocks_used"])

    reqs = [GenerateRequest(prompt_ids=doc + corpus.task(i), params=greedy(m), on_token=watch)
            for i, m in enumerate(lengths)]
    _, ours = run(eng, reqs)
    eng.async_scheduling = False  # the same on another document, each step's tokens read before the next plan
    doc2 = corpus.doc(n)
    _, ours_sync = run(eng, [GenerateRequest(prompt_ids=doc2 + corpus.task(i), params=greedy(m))
                             for i, m in enumerate(lengths)])
    eng.async_scheduling = True
    dense.generate_ids([doc + corpus.task(0)], greedy(8))  # warm-up
    b.sync()
    t0 = time.perf_counter()
    dense.generate_ids([doc + corpus.task(0)], greedy(256))
    b.sync()
    alone = time.perf_counter() - t0
    one_doc = (n + 256) * bytes_per_token(model.config, model.dtype)
    used = peak * eng.cache.size.bytes_per_block
    return {"doc_tokens": n, "ours_s": round(ours, 3), "alone_prefill_plus_256_s": round(alone, 3),
            "time_ratio": round(ours / alone, 3), "goal_time_ratio": 1.15,
            "ours_sync_s": round(ours_sync, 3), "sync_time_ratio": round(ours_sync / alone, 3),
            "kv_peak_bytes": used, "kv_one_document_bytes": one_doc, "kv_ratio": round(used / one_doc, 3),
            "goal_kv_ratio": 1.05}


def _start_decoding(eng: ServingEngine, reqs: list[GenerateRequest]) -> list[Any]:
    """Submit, step until every request decodes, and 3 steps more (the captures)."""
    futs = [eng.submit(r) for r in reqs]
    eng._drain_inbox()
    while eng.scheduler.stats()["running"] < len(reqs) or eng.scheduler.stats()["waiting"] or _prefilling(eng):
        if any(f.done() for f in futs):  # too_long or an error: say so instead of spinning
            raise RuntimeError(f"a request ended before decoding: {[f.exception() for f in futs if f.done()]}")
        eng.step()
    for _ in range(3):
        eng.step()
    return futs


def _steps_ms(b: Bench, step: Any, steps: int) -> float:
    b.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    b.sync()
    return (time.perf_counter() - t0) / steps * 1000


def _decode_step_ms(b: Bench, eng: ServingEngine, reqs: list[GenerateRequest], steps: int) -> float:
    futs = _start_decoding(eng, reqs)
    ms = _steps_ms(b, eng.step, steps)
    if b.device.type == "cuda":  # diagnostics, kept out of the timing
        key = f"{len(reqs)} rows, {'async' if eng.async_scheduling else 'sync'}"
        try:
            b.res.setdefault("host_syncs_per_decode_step", {})[key] = _host_syncs(eng, 5)
        except Exception as exc:
            log.warning("sync count failed: %r", exc)
    for r in reqs:
        eng.cancel(r.request_id)
    eng.run_until_idle()
    del futs
    return ms


def _host_syncs(eng: ServingEngine, steps: int) -> float:
    """Operations that made the host wait for the device per step, as CUDA's sync debug mode reports
    them (the read-back's event wait is not one of them): 0 when a launch only queues work."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                eng.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen) / steps


def _prefilling(eng: ServingEngine) -> bool:
    return any(s.num_computed < len(s.token_ids) - 1 for s in eng.scheduler._running)


def group(b: Bench, eng: ServingEngine, corpus: Corpus) -> dict:
    n = 512 if b.smoke else 32768
    steps = 4 if b.smoke else 40
    doc = corpus.doc(n)
    one = _decode_step_ms(b, eng, [GenerateRequest(prompt_ids=doc + corpus.task(0), params=greedy(10_000 if not b.smoke else 200))], steps)
    eight = _decode_step_ms(b, eng, [GenerateRequest(prompt_ids=doc + corpus.task(i), params=greedy(200 if b.smoke else 10_000))
                                     for i in range(8)], steps)
    return {"prefix_tokens": n, "one_request_step_ms": round(one, 3), "eight_requests_step_ms": round(eight, 3),
            "ratio": round(eight / one, 3), "goal_ratio": 1.2}


def batch32(b: Bench, eng: ServingEngine, corpus: Corpus) -> dict:
    model = eng.model
    n, rows = (128, 4) if b.smoke else (4096, 32)
    steps = 4 if b.smoke else 30
    ms = _decode_step_ms(b, eng, [GenerateRequest(prompt_ids=corpus.doc(n), params=greedy(1000))
                                  for _ in range(rows)], steps)
    kv = rows * (n + steps + 8) * bytes_per_token(model.config, model.dtype)
    floor_ms = (WEIGHT_BYTES + kv) / (COPY_TBPS * 1e12) * 1000
    return {"rows": rows, "context": n, "step_ms": round(ms, 3), "tokens_per_s": round(rows / ms * 1000, 1),
            "floor_step_ms": round(floor_ms, 3), "floor_tokens_per_s": round(rows / floor_ms * 1000, 1),
            "fraction_of_floor": round(floor_ms / ms, 3), "goal_fraction": 0.8}


def stream(b: Bench, eng: ServingEngine, corpus: Corpus, dense: DenseGenerator, n_docs: int) -> dict:
    rng = random.Random(1)
    docs = []
    for _ in range(n_docs):
        n = rng.randrange(200, 600) if b.smoke else rng.randrange(2048, 60_000)
        tasks = rng.randrange(3, 6)
        docs.append((rng.expovariate(1.0) * (0.05 if b.smoke else 1.5), corpus.doc(n),
                     [(corpus.task(t), rng.choice([64, 128, 256])) for t in range(tasks)]))
    arrivals = [sum(a for a, _, _ in docs[: i + 1]) for i in range(len(docs))]
    busy0 = eng.busy_s
    eng.start()  # the last stage: the engine thread serves the stream as a worker's would
    ttft: list[float] = []
    t0 = time.perf_counter()
    futs = []
    for (_, doc, tasks), at in zip(docs, arrivals, strict=True):
        while time.perf_counter() - t0 < at:
            time.sleep(0.005)
        submitted = time.perf_counter()
        first = {"t": None}

        def on_token(_tok: int, first=first, submitted=submitted) -> None:
            if first["t"] is None:
                first["t"] = time.perf_counter() - submitted
                ttft.append(first["t"])

        for task, m in tasks:
            futs.append(eng.submit(GenerateRequest(prompt_ids=doc + task, params=greedy(m), on_token=on_token)))
    wait(futs)
    wall = time.perf_counter() - t0
    stats = eng.stats()
    eng.shutdown()
    t1 = time.perf_counter()
    for _, doc, tasks in docs:  # today: one request at a time, each prefilled from scratch
        for task, m in tasks:
            dense.generate_ids([doc + task], greedy(m))
    b.sync()
    base = time.perf_counter() - t1
    ttft.sort()
    return {"documents": n_docs, "tasks": sum(len(t) for _, _, t in docs),
            "doc_tokens": [len(d) for _, d, _ in docs], "ours_wall_s": round(wall, 2),
            "ours_docs_per_hour": round(n_docs / wall * 3600, 1), "busy_fraction": round((eng.busy_s - busy0) / wall, 3),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(ttft[int(0.95 * (len(ttft) - 1))], 3),
            "baseline_wall_s": round(base, 2), "baseline_docs_per_hour": round(n_docs / base * 3600, 1),
            "speedup": round(base / wall, 2), "prefix_hit_tokens": stats["prefix_hit_tokens"],
            "preemptions": stats["preemptions"]}


def regress(b: Bench, eng: ServingEngine, corpus: Corpus, dense: DenseGenerator, with_prefill: bool = True) -> dict:
    n = 1024 if b.smoke else 65536
    run(eng, [GenerateRequest(prompt_ids=corpus.doc(n // 4), params=greedy(1))])  # warm-up
    prefill = []
    for _ in range(2 if with_prefill else 0):  # --no-long-prefill: the decode legs alone (a short device call)
        _, s = run(eng, [GenerateRequest(prompt_ids=corpus.doc(n - 8), params=greedy(1))])
        prefill.append(s)
    ctx = 256 if b.smoke else 4096
    steps = 8 if b.smoke else 100
    ms = _decode_step_ms(b, eng, [GenerateRequest(prompt_ids=corpus.doc(ctx), params=greedy(1000))], steps)
    eng.async_scheduling = False
    sync_ms = _decode_step_ms(b, eng, [GenerateRequest(prompt_ids=corpus.doc(ctx), params=greedy(1000))], steps)
    eng.async_scheduling = True
    dense_ms = _dense_decode_ms(b, dense, corpus.doc(ctx), steps)
    return {"prefill_tokens": n, "prefill_s": round(min(prefill), 3) if prefill else None, "goal_prefill_s": 2.6,
            "decode_b1_context": ctx, "decode_b1_ms": round(ms, 3), "goal_decode_ms": 4.5,
            "decode_b1_sync_ms": round(sync_ms, 3), "dense_graph_b1_ms": round(dense_ms, 3)}


def _dense_step(dense: DenseGenerator, prompt: list[int], steps: int) -> Any:
    """Today's dense path at batch 1: its decode step (a CUDA graph on CUDA) with the greedy pick on the
    device, the host never reading a token (the floor of what per-step host work can cost); captured."""
    model = dense.model
    cache = dense.new_cache(1, len(prompt) + steps + 8)
    logits = prefill_chunked(model, prompt, cache, chunk_size=dense.chunk_size)
    step = dense.decode_step(cache, pick=lambda x: x.argmax(dim=-1), capture_pick=True)
    step.start(logits.argmax(dim=-1)[None], torch.tensor([len(prompt)], device=model.device))
    for _ in range(3):
        step.advance()  # capture
    return step


def _dense_decode_ms(b: Bench, dense: DenseGenerator, prompt: list[int], steps: int) -> float:
    return _steps_ms(b, _dense_step(dense, prompt, steps).advance, steps)


def profile(b: Bench, eng: ServingEngine, corpus: Corpus, dense: DenseGenerator) -> dict:
    """Batch-1 decode at 4K kernel by kernel (bench/decode_profile.py): the engine's graph step, the
    same step eager, the dense graph step. (Recapturing the engine's graphs in one process, to compare
    the K/V write fused and unfused, tripped an allocator assert in run 1: the graphs share one pool.)"""
    from bench.decode_profile import profile_steps, table

    ctx, steps = (256, 8) if b.smoke else (4096, 60)
    out: dict[str, Any] = {"context": ctx}
    reqs = [GenerateRequest(prompt_ids=corpus.doc(ctx), params=greedy(4000 if not b.smoke else 1000))]
    _start_decoding(eng, reqs)
    profiles = {"engine graph": profile_steps(eng.step, steps, b.sync)}
    eng.runner.cuda_graphs, graphs = False, eng.runner.cuda_graphs
    profiles["engine eager"] = profile_steps(eng.step, max(4, steps // 6), b.sync)
    eng.runner.cuda_graphs = graphs
    for r in reqs:
        eng.cancel(r.request_id)
    eng.run_until_idle()
    profiles["dense graph"] = profile_steps(_dense_step(dense, corpus.doc(ctx), steps + 8).advance, steps, b.sync)
    out["profiles"] = profiles
    out["table"] = table(profiles)
    print("\n".join(out["table"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--tokenizer", default="../shared/tokenizers/gpt-neox-20b")
    parser.add_argument("--skip", default="")
    parser.add_argument("--stream-docs", type=int, default=8)
    parser.add_argument("--no-long-prefill", action="store_true", help="regress: skip the 65K prefill timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    b = ServingBench(args.out, smoke=args.cpu_smoke)
    skip = set(filter(None, args.skip.split(",")))
    model = b.build_model(2048 if b.smoke else 65536)
    tok = Tokenizer.from_dir(Path(args.tokenizer))
    corpus = Corpus(tok, model.config.vocab_size)
    dense = DenseGenerator(model, tok, chunk_size=16384)
    eng = engine(b, model, tok)
    stages = {
        "check": lambda: check(b, eng, corpus, dense),
        "regress": lambda: regress(b, eng, corpus, dense, with_prefill=not args.no_long_prefill),
        "document": lambda: document(b, eng, corpus, dense),
        "group": lambda: group(b, eng, corpus),
        "batch32": lambda: batch32(b, eng, corpus),
        "stream": lambda: stream(b, eng, corpus, dense, args.stream_docs),
        "profile": lambda: profile(b, eng, corpus, dense),
    }
    for name, fn in stages.items():
        if name not in skip:
            b.stage(name, fn)
            torch.cuda.empty_cache() if b.device.type == "cuda" else None
    print(json.dumps(b.res, indent=1, default=str))


if __name__ == "__main__":
    main()
