"""Documents per hour over the corpus's text on one H200 (MPT-7B shape, random bf16 weights, the real
MPT tokenizer): our MPT strategies on the serving engine against the seed's recipe (HF transformers
MptForCausalLM + generate, task by task, each document truncated to what HF holds) in the same run.

Each document: a summary of 256 tokens, 3 questions, classification with the default labels. The
documents come from .corpus-text/corpus.json (bench/corpus_text.py parses and chunks the corpus on a
CPU machine; the GPU machine has no corpus). Random weights emit garbage, so generation lengths are
made deterministic and equal on both sides: by default ("--lengths full") every generation runs to its
limit (stop strings and end-of-text switched off: 256 summary tokens, 64 per answer, map-reduce windows
included) and HF generates exactly as many (min_new_tokens = max_new_tokens); "--lengths natural" keeps
our stops and gives HF, per document and task, the token counts our engine produced.

Stages (tasks_mpt.json rewritten after each, so a crash keeps what ran; with --lengths full HF runs
right after setup, with natural lengths last, since it needs what ours generated):
  setup        model (Bench.build_model: alibi_bias_max 8, HF's only value), tokenizer, corpus
  hf           the seed's recipe (bench/tasks_hf.py) on --hf-docs documents spread over the lengths,
               one after another, per-document seconds
  warmup       the engine's own warm-up at load (pipeline/engine/warmup.py, timed), then shuffled copies of 4 documents (the longest among them) through our engine, 16-token outputs
  ours         every document's 3 jobs concurrently through pipeline.tasks.run_task, --inflight
               documents at once: docs/hour = docs / wall, busy fraction = ServingEngine.busy_s / wall
               (and NVML's GPU utilization, sampled), tokens from engine.stats()
  variants     the corpus again on the same engine under --variants settings (the prefix cache emptied
               before each): the GIL switch interval, documents in flight, the step's token budget,
               a step's prefill chunks as one forward
  ours_subset  HF's documents again, on a fresh engine (nothing from the prefix cache; warmed up on
               shuffled copies of them): the same-documents rate
  summary      the table: ours docs/hour, HF docs/hour (its documents, and estimated over the documents
               ours finished by interpolating HF's seconds over each one's truncated length), ratios
Bounded: --deadline-s (230 s from the start) cuts every budget; a stage that runs out of time stops
starting documents, and documents still in flight --grace-s later are given up on (reported).

H200 (wheels for pydantic, bm25s, PyStemmer carried in .whl/tasks_mpt; ~6 minutes). Ours and HF run in
two processes (run 1 ran them in one: after HF's stage ~105 GiB stayed in use outside the caching
allocator, and our KV pool, sized from free memory, got 13.9 GiB): --stages, then --merge:
  source bench/h200_env.sh; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/tasks_mpt/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH:. && A="--tokenizer .tok \
      --corpus-json .corpus-text/corpus.json" && mkdir -p $OUT/ours && \
  python3 bench/tasks_mpt.py $A --out $OUT/ours --stages setup,warmup,ours,ours_subset && \
  python3 bench/tasks_mpt.py $A --out $OUT --stages setup,hf --merge $OUT/ours/tasks_mpt.json
Each stage's device memory (free, allocator-held, outside the allocator) lands in "memory".
CPU:   PYTHONPATH=. python bench/tasks_mpt.py --cpu-smoke --out /tmp   (tiny model, 3 documents, < 1 minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.corpus_text import DEFAULT_OUT, DEFAULT_TOKENIZER, QUESTIONS, SUMMARY_TOKENS, load_corpus
from bench.engine import TINY, Bench
from bench.tasks_hf import HfRecipe, Lengths
from bench.tasks_run import DocRunner, GpuSampler, Recorder, shuffled
from pipeline.engine.backends import select_backend
from pipeline.engine.config import MptConfig
from pipeline.engine.model import Mpt
from pipeline.engine.serving import ServingEngine
from pipeline.engine.step_trace import StepTrace
from pipeline.engine.tokenizer import Tokenizer
from pipeline.engine.warmup import warm_up
from pipeline.tasks import validate_params
from pipeline.tasks.mpt.engine import MptEngine, ServingOptions, engine_config
from pipeline.tasks.mpt.prompts import FAMILY_SPECS, PromptBuilder
from pipeline.tasks.mpt.qa import ANSWER_TOKENS

log = logging.getLogger("bench.tasks_mpt")
GIB = 1 << 30
MODEL_NAME = "mpt-7b-storywriter-shape (random weights)"
GOAL = 25.0


class TasksBench(Bench):
    results_name = "tasks_mpt.json"


def tiny_model(b: Bench, max_seq_len: int, vocab: int) -> Mpt:
    """bench.engine's TINY shape with the real tokenizer's vocabulary (CPU smoke)."""
    config = MptConfig(**{**TINY, "vocab_size": vocab}, max_seq_len=max_seq_len, alibi_bias_max=8, no_bias=True)
    model = Mpt(config).to(b.device, b.dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02)
    model.reset_slopes(b.device)
    model.backend = select_backend(b.device)
    b.res["backend"] = model.backend.name
    return model.eval()


def hf_subset(docs: list[tuple[dict, Any]], n: int, cap: int) -> list[int]:
    """Indexes of `n` documents spread over the truncated lengths HF reads (quantile midpoints)."""
    order = sorted(range(len(docs)), key=lambda i: (min(docs[i][0]["tokens"], cap), docs[i][0]["name"]))
    picks = [order[min(len(order) - 1, int((k + 0.5) / n * len(order)))] for k in range(n)]
    return list(dict.fromkeys(picks))


def setup(b: TasksBench, args: argparse.Namespace) -> dict:
    tok = Tokenizer.from_dir(Path(args.tokenizer))
    header, docs = load_corpus(Path(args.corpus_json))
    docs = [d for d in docs if d[1].full_text.strip()]
    random.Random(0).shuffle(docs)  # long and short documents mixed, the same order every run
    if b.smoke:  # a 2,048-token context: short documents still take the map-reduce and retrieval paths
        docs = [d for d in docs if d[0]["tokens"] <= 12000]
    if args.limit_docs:
        docs = docs[: args.limit_docs]
    max_len = 2048 if b.smoke else 65536
    model = tiny_model(b, max_len, max(50432, tok.vocab_size)) if b.smoke else b.build_model(max_len)
    picks = hf_subset(docs, args.hf_docs, 512 if b.smoke else args.hf_max_tokens)
    b.private.update(tok=tok, docs=docs, model=model, hf_picks=picks, labels=validate_params("classify", {})["labels"])
    return {"documents": len(docs), "pages": sum(m["pages"] for m, _ in docs),
            "doc_tokens": sum(m["tokens"] for m, _ in docs), "max_model_len": max_len,
            "hf_documents": [docs[i][0]["name"] for i in picks], "corpus_skipped": header.get("skipped"), "corpus_left_out": len(header.get("left_out", [])),
            "lengths": args.lengths, "inflight": args.inflight, "embedding_model": None,
            "note": "retrieval is BM25 only (no embedder on the GPU machine)"}


def start_engine(b: TasksBench, args: argparse.Namespace) -> dict:
    model, tok = b.private["model"], b.private["tok"]
    cap = int(args.kv_gib * GIB) if not b.smoke else 256 << 20
    # the gpu worker's engine settings (ServingOptions' defaults), with the pool capped
    config = dataclasses.replace(engine_config(ServingOptions()), kv_cache_bytes=cap)
    serving = ServingEngine(model, tok, config, model_name=MODEL_NAME)
    recorder = Recorder(serving, force_full=args.lengths == "full", max_new_cap=args.max_new_cap)
    engine = MptEngine(recorder, model=MODEL_NAME, embedding_model=None, prompt_family="completion")
    b.private.update(serving=serving, recorder=recorder, engine=engine)
    return {"kv_pool_gib": round(serving.cache.size.num_blocks * serving.cache.size.bytes_per_block / GIB, 2)}


def _runner(b: TasksBench, args: argparse.Namespace) -> DocRunner:
    jobs = {"summarize": {"max_tokens": args.summary_tokens}, "qa": {"questions": list(QUESTIONS)}, "classify": {}}
    return DocRunner(b.private["engine"], b.private["recorder"], jobs, args.inflight)


def remaining(b: TasksBench, args: argparse.Namespace) -> float:
    """Seconds left before --deadline-s (counted from the start of the script)."""
    return args.deadline_s - (time.perf_counter() - b.t0)


def warmup(b: TasksBench, args: argparse.Namespace, picks: list | None = None) -> dict:
    """Shuffled copies of documents (by default spread over the lengths, the longest among them: long
    prefills compile kernels of their own), outputs capped at 16 tokens: kernels, graphs and the
    allocator warmed up, nothing left in the prefix cache that the measured run could reuse."""
    out = start_engine(b, args)
    # the product's warm-up at load first (what a gpu worker runs), timed; then the bench's own
    # documents, whose time shows what it left to compile
    out["engine_warm_up"] = dataclasses.asdict(warm_up(b.private["serving"]))
    if picks is None:
        docs = sorted(b.private["docs"], key=lambda d: d[0]["tokens"])
        qs = [0.5] if b.smoke else [0.2, 0.5, 0.8, 1.0][: args.inflight]
        picks = [docs[min(len(docs) - 1, int(q * len(docs)))] for q in qs]
    copies = [(dict(m, name="warmup:" + m["name"]), shuffled(doc, i)) for i, (m, doc) in enumerate(picks)]
    recorder: Recorder = b.private["recorder"]
    recorder.max_new_cap = min(16, args.max_new_cap or 16)
    try:
        # all start at once; the grace is long: a warm-up given up on leaves its compiles to the measured
        # stage (run 3: one step of the abandoned warm-up ran ~50 s into it)
        run = _runner(b, args).run(copies, budget_s=1.0, grace_s=args.warmup_grace_s)
    finally:
        recorder.max_new_cap = args.max_new_cap
    return {**out, "documents": [m["name"] for m, _ in copies], "wall_s": run["wall_s"],
            "errors": run["errors"], "gave_up": run["gave_up"]}


def ours(b: TasksBench, args: argparse.Namespace, name: str = "corpus", docs: list | None = None) -> dict:
    serving: ServingEngine = b.private["serving"]
    if docs is None:  # the corpus: what time allows, keeping room for the in-flight tail and the subset run
        docs = b.private["docs"]
        budget = min(args.ours_budget_s, max(10.0, remaining(b, args) - args.grace_s - args.subset_reserve_s))
    else:
        budget = 1.0  # a handful of documents: all start at once
    grace = max(5.0, min(args.grace_s, remaining(b, args) - budget))
    before, busy0 = serving.stats(), serving.busy_s
    serving.trace = StepTrace()  # set between steps: the engine reads it once per launch
    sampler = GpuSampler(b.device)
    sampler.start()
    run = _runner(b, args).run(docs, budget_s=budget, grace_s=grace)
    b.private["gave_up"] = run["gave_up"]
    util = sampler.stop()
    trace, serving.trace = serving.trace, None
    after = serving.stats()
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)
             and k in ("requests", "tokens_in", "tokens_out", "steps", "failed", "prefix_hit_tokens", "preemptions",
                       "busy_ms", "launch_ms", "wait_ms")}
    wall = run["wall_s"]
    done = run["documents_done"]
    res = {"set": name, "budget_s": round(budget, 1), **{k: v for k, v in run.items() if k != "per_document"},
           "docs_per_hour": round(done / wall * 3600, 1) if wall and done else None,
           "pages_per_hour": round(sum(r["pages"] for r in run["per_document"]) / wall * 3600, 1) if wall else None,
           "busy_fraction": round((serving.busy_s - busy0) / wall, 3) if wall else None,
           "gpu_utilization_mean": util, **delta, "step_trace": trace.summary()}
    b.private.setdefault("per_document", {})[name] = run["per_document"]
    res["per_document"] = run["per_document"]
    return res


VARIANT_KEYS = ("switch", "inflight", "step_tokens", "batch_prefills", "skip")


def parse_variants(text: str) -> list[dict[str, float]]:
    """"switch=0.0005;inflight=16,step_tokens=32768" -> [{"switch": 0.0005}, {"inflight": 16, ...}]."""
    out = []
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        variant = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key not in VARIANT_KEYS:
                raise ValueError(f"unknown variant key {key!r} (known: {', '.join(VARIANT_KEYS)})")
            variant[key] = float(value)
        out.append(variant)
    return out


def variants(b: TasksBench, args: argparse.Namespace) -> dict:
    """The corpus again on the same warm engine under each --variants setting (the GIL switch interval,
    documents in flight, the step's token budget and prefill chunk), the prefix cache emptied before
    each, so each run reads every document from scratch as the first did."""
    import sys

    serving: ServingEngine = b.private["serving"]
    sched = serving.scheduler
    base = (sys.getswitchinterval(), sched.max_num_batched_tokens, sched.max_prefill_chunk, serving.runner.batch_prefills,
            serving.cache.skip_decode)
    out = {}
    for variant in parse_variants(args.variants):
        name = ",".join(f"{k}={v:g}" for k, v in variant.items())
        if name in out:  # a setting repeated (an A/B/A): each run keeps its own entry
            name = f"{name} #{sum(1 for n in out if n.split(' #')[0] == name) + 1}"
        if remaining(b, args) < 60:
            out[name] = {"skipped": f"{remaining(b, args):.0f} s left"}
            continue
        if not serving.reset_prefix_cache().result(timeout=60):
            out[name] = {"skipped": "blocks still held"}
            continue
        b.private["recorder"].generated.clear()  # per-document counts of this run only
        sys.setswitchinterval(variant.get("switch", base[0]))
        tokens = int(variant.get("step_tokens", base[1]))
        sched.max_num_batched_tokens, sched.max_prefill_chunk = tokens, min(tokens, max(base[2], tokens))
        serving.runner.batch_prefills = bool(variant.get("batch_prefills", base[3]))
        # each setting's decode graphs are captured at its first steps and kept (runner.py)
        serving.cache.skip_decode = bool(variant.get("skip", base[4]))
        run_args = argparse.Namespace(**{**vars(args), "inflight": int(variant.get("inflight", args.inflight))})
        try:
            res = ours(b, run_args, f"variant {name}")
        finally:
            sys.setswitchinterval(base[0])
            sched.max_num_batched_tokens, sched.max_prefill_chunk = base[1], base[2]
            serving.runner.batch_prefills = base[3]
            serving.cache.skip_decode = base[4]
        out[name] = {k: v for k, v in res.items() if k != "per_document"}
    return out


def ours_subset(b: TasksBench, args: argparse.Namespace) -> dict:
    """HF's documents, as HF read them before truncation, on a fresh engine (an empty prefix cache:
    the corpus run's blocks cannot help), warmed up on shuffled copies of the same documents."""
    free_engine(b)
    if b.private.get("gave_up"):
        return {"skipped": "the corpus run gave up on documents still in flight"}
    if remaining(b, args) < 20:
        return {"skipped": f"{remaining(b, args):.0f} s left before the deadline"}
    held = round(torch.cuda.memory_allocated() / GIB, 1) if b.device.type == "cuda" else None
    docs = [b.private["docs"][i] for i in b.private["hf_picks"]]
    warm = warmup(b, args, picks=docs)
    try:
        return {**ours(b, args, "hf_subset", [(dict(m, name="again:" + m["name"]), d) for m, d in docs]),
                "warmup_s": warm["wall_s"], "kv_pool_gib": warm["kv_pool_gib"], "gib_held_before": held}
    finally:
        free_engine(b)


def free_engine(b: TasksBench) -> None:
    """Our engine's KV pool and graphs handed back before HF's eager attention needs the memory."""
    serving = b.private.pop("serving", None)
    if serving is not None:
        serving.shutdown()
    for key in ("engine", "recorder"):
        b.private.pop(key, None)
    del serving
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


def lengths_for(b: TasksBench, args: argparse.Namespace, name: str) -> Lengths:
    cap = args.max_new_cap or 1 << 30
    full = Lengths(min(args.summary_tokens, cap), (min(ANSWER_TOKENS, cap),) * len(QUESTIONS))
    if args.lengths == "full":
        return full
    per_doc = {d["name"]: d for d in b.private.get("per_document", {}).get("corpus", [])}.get(name, {})
    answers = tuple(max(1, n or 1) for n in per_doc.get("qa_generated") or ())  # generate() needs >= 1
    return Lengths(max(1, per_doc.get("summary_tokens_out") or full.summary),
                   answers if len(answers) == len(QUESTIONS) else full.answers)


def hf(b: TasksBench, args: argparse.Namespace) -> dict:
    from bench import hf_reference

    free_engine(b)  # ours_subset did (natural lengths: ours ran first), unless it failed
    model, tok = b.private["model"], b.private["tok"]
    cap = 512 if b.smoke else args.hf_max_tokens
    recipe = HfRecipe(hf_reference.hf_model(model), PromptBuilder(tok, FAMILY_SPECS["completion"], tok.eos_token_id),
                      cap, b.device)
    docs = b.private["docs"]
    warm = sorted(docs, key=lambda d: d[0]["tokens"])[0][1]
    recipe.document(warm, QUESTIONS[:1], b.private["labels"][:2], Lengths(4, (4,)))  # warm-up
    rows, deadline = [], time.perf_counter() + min(args.hf_budget_s, max(remaining(b, args) - 60, 0))
    for i in b.private["hf_picks"]:
        meta, doc = docs[i]
        if time.perf_counter() > deadline:
            break
        try:
            row = recipe.document(doc, QUESTIONS, b.private["labels"], lengths_for(b, args, meta["name"]))
        except torch.OutOfMemoryError as exc:
            row = {"error": f"OOM: {exc}"[:300]}
        rows.append({"name": meta["name"], "pages": meta["pages"], **row})
        b.res["hf_partial"] = rows
        b.save()
    b.res.pop("hf_partial", None)
    del recipe
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    ok = [r for r in rows if "total_s" in r]
    total = sum(r["total_s"] for r in ok)
    return {"max_tokens": cap, "documents": len(ok), "seconds": round(total, 2),
            "docs_per_hour": round(len(ok) / total * 3600, 1) if total else None,
            "per_document": rows, "estimated_s": estimated_seconds(docs, ok, cap)}


def estimated_seconds(docs: list[tuple[dict, Any]], rows: list[dict], cap: int) -> dict[str, float]:
    """HF's seconds for every corpus document, interpolated (np.interp, clamped at the ends) over the
    tokens each one gives HF (its length truncated to the cap) from the measured documents: HF's cost
    depends on that alone."""
    if not rows:
        return {}
    pts = sorted((r["read_tokens"], r["total_s"]) for r in rows)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return {m["name"]: round(float(np.interp(min(m["tokens"], cap), xs, ys)), 3) for m, _ in docs}


def summary(b: TasksBench) -> dict:
    res = b.res
    o, s, h = res.get("ours", {}), res.get("ours_subset", {}), res.get("hf", {})
    per_doc = h.get("estimated_s") or {}
    done = [d["name"] for d in o.get("per_document", [])]  # the documents ours finished, estimated for HF
    est: dict[str, Any] = {}
    if per_doc and done:
        seconds = sum(per_doc[n] for n in done)
        est = {"documents": len(done), "seconds": round(seconds, 1), "docs_per_hour": round(len(done) / seconds * 3600, 1)}

    def ratio(x: Any, y: Any) -> float | None:
        return round(x / y, 2) if isinstance(x, int | float) and isinstance(y, int | float) and y else None

    out = {"ours_docs_per_hour": o.get("docs_per_hour"), "ours_subset_docs_per_hour": s.get("docs_per_hour"),
           "hf_subset_docs_per_hour": h.get("docs_per_hour"), "hf_corpus_estimate_docs_per_hour": est.get("docs_per_hour"),
           "ratio_corpus": ratio(o.get("docs_per_hour"), est.get("docs_per_hour")),
           "ratio_same_documents": ratio(s.get("docs_per_hour"), h.get("docs_per_hour")),
           "busy_fraction": o.get("busy_fraction"), "gpu_utilization_mean": o.get("gpu_utilization_mean"),
           "goal_ratio": GOAL, "hf_measured_on": [r["name"] for r in h.get("per_document", [])]}
    rows = [("ours, corpus", o.get("documents_done"), o.get("wall_s"), out["ours_docs_per_hour"]),
            ("ours, HF's documents", s.get("documents_done"), s.get("wall_s"), out["ours_subset_docs_per_hour"]),
            ("HF, its documents", h.get("documents"), h.get("seconds"), out["hf_subset_docs_per_hour"]),
            ("HF, corpus (estimate)", est.get("documents"), est.get("seconds"), out["hf_corpus_estimate_docs_per_hour"])]
    lines = ["| run | docs | seconds | docs/hour |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {d} | {w} | {r} |" for n, d, w, r in rows]
    lines.append(f"ratio over the corpus {out['ratio_corpus']}x, on the same documents "
                 f"{out['ratio_same_documents']}x (goal >= {GOAL:g}x); busy fraction {out['busy_fraction']}, "
                 f"GPU utilization {out['gpu_utilization_mean']}")
    print("\n".join(lines), flush=True)
    out["table"] = lines
    return out


def memory_reading(b: Bench) -> dict[str, float] | None:
    """Device memory after a stage: what the caching allocator holds, and what the device has free
    (the pool is sized from the latter, so memory held outside the allocator shows as the gap)."""
    if b.device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(b.device)
    return {"free_gib": round(free / GIB, 2), "total_gib": round(total / GIB, 2),
            "allocated_gib": round(torch.cuda.memory_allocated(b.device) / GIB, 2),
            "reserved_gib": round(torch.cuda.memory_reserved(b.device) / GIB, 2),
            "outside_allocator_gib": round((total - free - torch.cuda.memory_reserved(b.device)) / GIB, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 4 documents, tiny HF")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--corpus-json", default=str(DEFAULT_OUT))
    ap.add_argument("--limit-docs", type=int, default=None)
    ap.add_argument("--inflight", type=int, default=4, help="documents in flight at once")
    ap.add_argument("--lengths", choices=("full", "natural"), default="full")
    ap.add_argument("--summary-tokens", type=int, default=SUMMARY_TOKENS)
    ap.add_argument("--max-new-cap", type=int, default=None, help="cap every generation (smoke: 16)")
    ap.add_argument("--kv-gib", type=float, default=80.0, help="our KV pool (HF never runs beside it)")
    ap.add_argument("--deadline-s", type=float, default=230.0, help="every budget below is cut to fit this")
    ap.add_argument("--ours-budget-s", type=float, default=150.0, help="no new corpus document after this")
    ap.add_argument("--grace-s", type=float, default=30.0, help="then documents in flight are given up")
    ap.add_argument("--warmup-grace-s", type=float, default=180.0, help="warm-up documents run to the end")
    ap.add_argument("--subset-reserve-s", type=float, default=30.0, help="kept for the ours_subset stage")
    ap.add_argument("--variants", default="", help="';'-separated settings the corpus runs again under "
                    "(variants stage): switch=<GIL switch interval s>, inflight=<documents>, step_tokens=<n>, "
                    "batch_prefills=<0|1>, skip=<0|1> (exact key skipping in decode attention)")
    ap.add_argument("--hf-docs", type=int, default=3)
    ap.add_argument("--hf-max-tokens", type=int, default=16384,
                    help="HF's truncation: what it holds on an H200 (its eager attention ran 16K, ran out of "
                         "memory at 32K: ../shared/anchors); runs 1-3 used 8,192")
    ap.add_argument("--hf-budget-s", type=float, default=150.0, help="no new HF document after this")
    ap.add_argument("--stages", default=None,
                    help="comma list of stages to run (default all); e.g. ours and HF in two processes, "
                         "'setup,warmup,ours,ours_subset' then 'setup,hf' with --merge")
    ap.add_argument("--merge", default="", help="comma list of earlier tasks_mpt.json files whose stages "
                                                "the summary also reads (a stage run here wins)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    b = TasksBench(args.out, smoke=args.cpu_smoke)
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index it builds at DEBUG
    if b.smoke:
        args.limit_docs = args.limit_docs or 3
        args.hf_docs = min(args.hf_docs, 2)
        args.max_new_cap = args.max_new_cap or 16
        torch.set_num_threads(1)  # tiny ops: a second intra-op thread only waits at barriers here
    b.res["args"] = vars(args)
    # HF first when the lengths are fixed (both baselines land before our part spends what time is left);
    # natural lengths: HF needs what ours generated, so ours first, and its engine freed before HF
    ours_stages = [("warmup", warmup), ("ours", ours), ("variants", variants), ("ours_subset", ours_subset)]
    stages = [("setup", setup), *([("hf", hf), *ours_stages] if args.lengths == "full" else [*ours_stages, ("hf", hf)])]
    if args.stages:
        wanted = set(args.stages.split(","))
        stages = [(n, fn) for n, fn in stages if n in wanted]
    for path in filter(None, args.merge.split(",")):
        earlier = json.loads(Path(path).read_text())
        b.res.setdefault("merged_from", []).append(path)
        for name in ("hf", "ours", "ours_subset", "warmup", "memory"):
            if name in earlier:
                b.res["memory_merged" if name == "memory" else name] = earlier[name]
    skip: set[str] = set()
    for name, fn in stages:
        if name in skip:
            b.res[name] = {"skipped": "an earlier stage failed"}
            continue
        result = b.stage(name, lambda fn=fn: fn(b, args))
        b.res.setdefault("memory", {})[name] = memory_reading(b)
        if result.get("error"):
            if name == "setup":  # nothing runs without a model
                skip |= {n for n, _ in stages}
            elif name == "warmup":
                skip |= {"ours", "variants", "ours_subset"}
    b.stage("summary", lambda: summary(b))


if __name__ == "__main__":
    main()
