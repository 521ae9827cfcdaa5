"""Host overhead of the MPT tasks path per engine step, against a plain decode loop on the same engine.

bench/tasks_mpt.py measured ~17.6 ms per engine step in the tasks flow on the H200 where the serving
bench's decode step is 5-10 ms, with the engine thread busy 99% of the time and the GPU 51%. This
script runs the same flow (bench/tasks_run.py DocRunner: each document's summary, 3 questions and
classification at once, one thread per job, every generation to its limit) and records each engine
step (bench/host_meters.py: wall, engine-thread CPU, forwards, prefill chunks, fa4 window syncs,
CUDA graph captures) and the job threads' CPU. "decode" submits generations of the same lengths on
the same documents straight to the engine, from no thread: the engine alone.

On CPU the model is tiny and its attention stubbed (the torch reference kernels over 14K keys would
hide the host's work), so what is left is host time. --repeats N runs the flow again on shuffled
copies of the documents (the same shapes, nothing in the prefix cache): a first run much slower than
the next ones means one-time work (kernel compiles, graph captures) inside the measured run.

    CPU:   PYTHONPATH=. python bench/tasks_host.py --out /tmp/th [--layers 32] [--profile]
    H200:  PYTHONPATH=. python bench/tasks_host.py --out $OUT --cuda --mpt7b --repeats 3 \\
               --tokenizer .tok --corpus-json .corpus-text/corpus.json [--old-windows] [--old-tokenization]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.corpus_text import DEFAULT_OUT, DEFAULT_TOKENIZER, QUESTIONS, SUMMARY_TOKENS, load_corpus
from bench.host_meters import JobMeter, StepMeter
from bench.tasks_run import DocRunner, Recorder, shuffled
from pipeline.engine.backends import select_backend
from pipeline.engine.config import MptConfig
from pipeline.engine.core.requests import GenerateRequest, SamplingParams
from pipeline.engine.model import Mpt
from pipeline.engine.serving import EngineConfig, ServingEngine
from pipeline.engine.tokenizer import Tokenizer
from pipeline.tasks import validate_params
from pipeline.tasks.mpt.engine import MptEngine

log = logging.getLogger("bench.tasks_host")
DOCS = ("paper-layoutparser-empty-pages.pdf", "report-federal-register-2020-17221.pdf",
        "contract-zogenix-distributor.pdf")  # the HF subset of the H200 run (1.2K, 14K, 38K tokens)


# --- A/B switches: the code as it was, on the same tree -----------------------------------------

def stub_attention() -> None:
    """Attention at no cost on CPU (zeros for decode, the values for prefill): outputs are garbage
    either way (random weights); every host path stays as it is."""
    from pipeline.engine.backends import paged

    paged.torch_decode = lambda q, *args, **kwargs: torch.zeros_like(q)


def _free_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *, scale: float,
                  **kwargs: Any) -> torch.Tensor:
    return v[:, -q.shape[1]:]


def old_tokenization() -> None:
    """As before 93fcfb7: a single encode (holds the GIL) and an lru_cache every concurrent task misses."""
    import functools

    from pipeline.tasks.mpt import prompts

    Tokenizer.encode = lambda self, text: self.inner.encode(text, add_special_tokens=False).ids
    cached = functools.lru_cache(maxsize=8)(lambda tokenizer, text: tuple(tokenizer.encode(text)))
    prompts._DOCUMENT_IDS.get = cached


def old_windows() -> None:
    """As before 1939f86: fa4's windowed plan (a host sync per layer) for any call on >= 4096 keys."""
    from pipeline.engine.backends import fa4

    fa4.windows_pay = lambda tq, tk: tk >= fa4.WINDOW_MIN_KEYS


# --- model and engine ---------------------------------------------------------------------------

def build_model(args: argparse.Namespace, vocab: int, device: torch.device) -> Mpt:
    if args.mpt7b:  # random bf16 weights of MPT-7B's shape, the bench's attention backends
        from bench.engine import Bench

        return Bench(args.out, smoke=False).build_model(65536)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = MptConfig(d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, vocab_size=vocab,
                       max_seq_len=65536, alibi_bias_max=8, no_bias=True)
    model = Mpt(config).to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02).to(p))
    model.reset_slopes(device)
    model.backend = select_backend(device)
    if device.type == "cpu" and args.stub_attention:
        model.backend = dataclasses.replace(model.backend, prefill=_free_prefill)
    return model.eval()


def new_engine(model: Mpt, tok: Tokenizer, args: argparse.Namespace) -> ServingEngine:
    per_token = 2 * model.config.n_layers * model.config.d_model * model.dtype.itemsize
    config = EngineConfig(kv_cache_bytes=args.kv_tokens * per_token, async_scheduling=not args.sync,
                          batch_prefills=args.batch_prefills)
    return ServingEngine(model, tok, config, model_name="mpt-7b-storywriter (random weights)")


# --- the two flows ------------------------------------------------------------------------------

def tasks_flow(model: Mpt, tok: Tokenizer, docs: list, args: argparse.Namespace) -> list[dict[str, Any]]:
    serving = new_engine(model, tok, args)
    recorder = Recorder(serving, force_full=True)
    engine = MptEngine(recorder, model="mpt-7b-storywriter", embedding_model=None, prompt_family="completion")
    jobs = {"summarize": {"max_tokens": args.summary_tokens}, "qa": {"questions": list(QUESTIONS)},
            "classify": validate_params("classify", {})}
    runs = []
    try:
        recorder.max_new_cap = 4  # imports, lazy init, first kernels (not measured), on shuffled copies
        DocRunner(engine, recorder, jobs, args.inflight).run(
            [(dict(m, name="warm:" + m["name"]), shuffled(d, 1000)) for m, d in docs], budget_s=1.0, grace_s=900)
        recorder.max_new_cap = None
        for r in range(args.repeats):
            batch = [(dict(m, name=f"run{r}:" + m["name"]), d if r == 0 else shuffled(d, r)) for m, d in docs]
            runner = DocRunner(engine, recorder, jobs, args.inflight)
            meter, jobs_meter = StepMeter(serving, args.profile and r == 0), JobMeter(runner, args.profile and r == 0)
            t0 = meter.t0 = time.perf_counter()
            run = runner.run(batch, budget_s=1.0, grace_s=900)
            wall = time.perf_counter() - t0
            meter.close()
            out = {"wall_s": round(wall, 3), **meter.summary(),
                   "job_cpu_s": {k: round(v, 3) for k, v in jobs_meter.cpu_s.items()},
                   "tasks_s": {r["name"]: {t: v.get("s") for t, v in r["tasks"].items()} for r in run["per_document"]},
                   "errors": len(run["errors"]), "steps_detail": [dataclasses.asdict(s) for s in meter.steps]}
            if meter.prof is not None:
                out["engine_profile"], out["jobs_profile"] = meter.top(), jobs_meter.top()
            runs.append(out)
    finally:
        serving.shutdown()
    return runs


def decode_loop(model: Mpt, tok: Tokenizer, docs: list, args: argparse.Namespace) -> dict[str, Any]:
    """The same generation shapes without the task layer: per document that fits the pool, one
    summary-length and three answer-length generations on the document's ids."""
    serving = new_engine(model, tok, args)
    try:
        warm = [serving.submit(GenerateRequest(tok.encode(shuffled(d, 1000).full_text)[:2048],
                                               SamplingParams(max_new_tokens=4, greedy=True))) for _, d in docs]
        for f in warm:
            f.result()
        meter = StepMeter(serving)
        futures = []
        t0 = meter.t0 = time.perf_counter()
        for _, doc in docs:
            ids = tok.encode(doc.full_text)
            if len(ids) + args.summary_tokens + 64 > serving.scheduler.num_blocks * serving.scheduler.block_size:
                continue
            for i, n in enumerate((args.summary_tokens, 64, 64, 64)):
                params = SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)
                futures.append(serving.submit(GenerateRequest([*ids, 100 + i, 200 + i], params)))
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
        meter.close()
    finally:
        serving.shutdown()
    return {"wall_s": round(wall, 3), **meter.summary(), "steps_detail": [dataclasses.asdict(s) for s in meter.steps]}


def gil_probe(model: Mpt, tok: Tokenizer, docs: list, args: argparse.Namespace) -> dict[str, Any]:
    """The engine decoding 4 rows while another thread tokenizes the longest document 3 times (what 3
    tasks of one document did at once before 93fcfb7): how many steps the engine got through meanwhile."""
    text = max((d.full_text for _, d in docs), key=len)
    serving = new_engine(model, tok, args)
    try:
        ids = tok.encode(text[:20000])
        params = SamplingParams(max_new_tokens=4, greedy=True)
        for f in [serving.submit(GenerateRequest([*ids, i], params)) for i in range(4)]:
            f.result()
        meter = StepMeter(serving)
        params = SamplingParams(max_new_tokens=3000, greedy=True, stop_at_eos=False)  # outlasts the probe
        rows = [GenerateRequest([*ids, 9, i], params) for i in range(4)]
        for r in rows:
            serving.submit(r)
        time.sleep(0.3)  # steady decoding
        t0 = time.perf_counter() - meter.t0
        for _ in range(3):
            tok.encode(text)
        t1 = time.perf_counter() - meter.t0
        time.sleep(0.3)
        for r in rows:
            serving.cancel(r.request_id)
    finally:
        meter.close()
        serving.shutdown()
    during = [s for s in meter.steps if t0 <= s.at_s <= t1]
    before = [s for s in meter.steps if s.at_s < t0 and s.chunks == 0]
    return {"tokenize_s": round(t1 - t0, 3), "steps_during": len(during),
            "longest_step_during_ms": round(max((s.wall_ms for s in during), default=0.0), 1),
            "steps_per_s_before": round(len(before) / max(t0 - before[0].at_s, 1e-9), 1) if before else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--corpus-json", default=str(DEFAULT_OUT))
    ap.add_argument("--docs", default=",".join(DOCS), help="comma-separated names, or 'all'")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--mpt7b", action="store_true", help="MPT-7B's shape, random weights (CUDA)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-tokens", type=int, default=27400,
                    help="the KV pool (the H200 run's 13.4 GiB held 27.4K MPT-7B tokens: the 38K document fails)")
    ap.add_argument("--real-attention", dest="stub_attention", action="store_false", help="CPU: keep the kernels")
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--summary-tokens", type=int, default=SUMMARY_TOKENS)
    ap.add_argument("--repeats", type=int, default=1, help="measured runs (later ones on shuffled copies)")
    ap.add_argument("--sync", action="store_true", help="EngineConfig(async_scheduling=False)")
    ap.add_argument("--batch-prefills", action="store_true", help="EngineConfig(batch_prefills=True)")
    ap.add_argument("--profile", action="store_true", help="cProfile the engine thread and the job threads")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--gil-probe", action="store_true", help="only: engine steps while a thread tokenizes")
    ap.add_argument("--old-tokenization", action="store_true", help="A/B: tokenization as before 93fcfb7")
    ap.add_argument("--old-windows", action="store_true", help="A/B: fa4 window plans as before 1939f86")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.cuda or args.mpt7b else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
        if args.stub_attention:
            stub_attention()
    if args.old_tokenization:
        old_tokenization()
    if args.old_windows:
        old_windows()
    tok = Tokenizer.from_dir(Path(args.tokenizer))
    _, corpus = load_corpus(Path(args.corpus_json))
    by_name = {m["name"]: (m, d) for m, d in corpus}
    docs = list(by_name.values()) if args.docs == "all" else [by_name[n] for n in args.docs.split(",")]
    model = build_model(args, max(50432, tok.vocab_size), device)
    res: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "switch_interval_s": sys.getswitchinterval()}
    if args.gil_probe:
        print("gil_probe", json.dumps(gil_probe(model, tok, docs, args)))
        return
    res["tasks"] = tasks_flow(model, tok, docs, args)
    if not args.skip_decode:
        res["decode"] = decode_loop(model, tok, docs, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tasks_host.json").write_text(json.dumps(res, indent=1, default=str))
    brief = {k: v for k, v in res.items() if k in ("tasks", "decode")}
    for name, runs in brief.items():
        for i, run in enumerate(runs if isinstance(runs, list) else [runs]):
            print(name, i, json.dumps({k: v for k, v in run.items()
                                       if not k.endswith("profile") and k not in ("steps_detail", "tasks_s")}))
    if args.profile:
        print(res["tasks"][0].get("engine_profile", "")[:6000])
        print(res["tasks"][0].get("jobs_profile", "")[:6000])


if __name__ == "__main__":
    main()
