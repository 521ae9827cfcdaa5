"""Host overhead of the MPT tasks path per engine step, against a plain decode loop on the same engine.

bench/tasks_mpt.py measured ~17.6 ms per engine step in the tasks flow on the H200 where the serving
bench's decode step is 5-10 ms, with the engine thread busy 99% of the time and the GPU 51%. This
script runs the same flow (bench/tasks_run.py DocRunner: each document's summary, 3 questions and
classification at once, one thread per job) on a model whose compute costs next to nothing, so what
is left is host time, and records per engine step:
  wall_ms    inside ServingEngine.step
  cpu_ms     the engine thread's CPU time in it (time.thread_time); wall - cpu is time the thread
             waited (for the GIL, or for a CPU core on a loaded machine)
  forwards   model forwards launched: one per prefill chunk, one for all decode rows
and the job threads' CPU time (pure-Python work there holds the GIL the engine thread needs).
The baseline ("decode") submits prompts of the same lengths straight to the engine, from no thread.

    PYTHONPATH=. python bench/tasks_host.py --out /tmp/th [--layers 1] [--profile]
On the H200: add --cuda --layers 32 --d-model 4096 (random weights, MPT-7B shape) to see the real split.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import logging
import pstats
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.corpus_text import DEFAULT_OUT, DEFAULT_TOKENIZER, QUESTIONS, SUMMARY_TOKENS, load_corpus
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


def stub_attention() -> None:
    """Attention at no cost (zeros / the values as they are): on CPU the torch reference kernels over
    14K-38K keys would dominate the step and hide the host's work, which is what this script measures.
    The outputs are garbage either way (random weights); every host path stays as it is."""
    from pipeline.engine.backends import paged

    def decode(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(q)

    paged.torch_decode = decode  # type: ignore[assignment]


def _free_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *, scale: float,
                  **kwargs: Any) -> torch.Tensor:
    return v[:, -q.shape[1]:]


def build_model(args: argparse.Namespace, vocab: int, device: torch.device) -> Mpt:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = MptConfig(d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, vocab_size=vocab,
                       max_seq_len=65536, alibi_bias_max=8, no_bias=True)
    model = Mpt(config).to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02)
    model.reset_slopes(device)
    model.backend = select_backend(device)
    if args.stub_attention:
        model.backend = dataclasses.replace(model.backend, prefill=_free_prefill)
    return model.eval()


class StepMeter:
    """Wraps one engine's step() and its runner's launch(): per-step wall, engine-thread CPU, forwards."""

    def __init__(self, serving: ServingEngine, profile: bool) -> None:
        self.rows: list[tuple[float, float, int, int, float]] = []  # (wall_ms, cpu_ms, forwards, chunks, t_s)
        self.t0 = time.perf_counter()
        self.prof = cProfile.Profile() if profile else None
        self._forwards = 0
        self._chunks = 0
        step, launch = serving.step, serving.runner.launch

        def counted_launch(out: Any, sampling: Any) -> Any:
            self._forwards += len(out.prefills) + (1 if out.decodes else 0)
            self._chunks += len(out.prefills)
            return launch(out, sampling)

        def measured_step() -> None:
            self._forwards = self._chunks = 0
            w0, c0 = time.perf_counter(), time.thread_time()
            if self.prof is not None:
                self.prof.enable()
            try:
                step()
            finally:
                if self.prof is not None:
                    self.prof.disable()
                self.rows.append(((time.perf_counter() - w0) * 1e3, (time.thread_time() - c0) * 1e3,
                                  self._forwards, self._chunks, w0 - self.t0))

        serving.step = measured_step  # type: ignore[method-assign]
        serving.runner.launch = counted_launch  # type: ignore[method-assign]

    def summary(self) -> dict[str, Any]:
        rows = self.rows
        if not rows:
            return {}
        walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
        decode_only = [r for r in rows if r[3] == 0]
        return {"steps": len(rows), "wall_ms_total": round(sum(walls), 1), "cpu_ms_total": round(sum(cpus), 1),
                "wall_ms_per_step": round(statistics.mean(walls), 3), "cpu_ms_per_step": round(statistics.mean(cpus), 3),
                "wall_ms_median": round(statistics.median(walls), 3),
                "decode_only_steps": len(decode_only),
                "decode_only_wall_ms": round(statistics.mean(r[0] for r in decode_only), 3) if decode_only else None,
                "decode_only_cpu_ms": round(statistics.mean(r[1] for r in decode_only), 3) if decode_only else None,
                "forwards": sum(r[2] for r in rows), "prefill_chunks": sum(r[3] for r in rows),
                "max_chunks_in_a_step": max(r[3] for r in rows),
                "steps_with_chunks": sum(1 for r in rows if r[3]),
                "waited_ms_per_step": round(statistics.mean(w - c for w, c in zip(walls, cpus, strict=True)), 3),
                "slowest": [{"at_s": round(r[4], 3), "wall_ms": round(r[0], 1), "cpu_ms": round(r[1], 1),
                             "forwards": r[2], "chunks": r[3]} for r in sorted(rows, key=lambda r: -r[0])[:8]]}

    def top(self, n: int = 25) -> str:
        if self.prof is None:
            return ""
        buf = io.StringIO()
        pstats.Stats(self.prof, stream=buf).sort_stats("tottime").print_stats(n)
        return buf.getvalue()


class JobMeter:
    """The job threads' CPU time (and, with profile, where it goes), around DocRunner._job."""

    def __init__(self, runner: DocRunner, profile: bool) -> None:
        self.cpu_s: dict[str, float] = {}
        self.stats: pstats.Stats | None = None
        self._lock = threading.Lock()
        job = runner._job

        def measured(name: str, task: str, doc: Any) -> dict[str, Any]:
            prof = cProfile.Profile() if profile else None
            c0 = time.thread_time()
            if prof is not None:
                prof.enable()
            try:
                return job(name, task, doc)
            finally:
                if prof is not None:
                    prof.disable()
                with self._lock:
                    self.cpu_s[task] = self.cpu_s.get(task, 0.0) + time.thread_time() - c0
                    if prof is not None:
                        if self.stats is None:
                            self.stats = pstats.Stats(prof)
                        else:
                            self.stats.add(prof)

        runner._job = measured  # type: ignore[method-assign]

    def top(self, n: int = 25) -> str:
        if self.stats is None:
            return ""
        buf = io.StringIO()
        self.stats.stream = buf
        self.stats.sort_stats("cumulative").print_stats(n)
        return buf.getvalue()


def new_engine(model: Mpt, tok: Tokenizer, args: argparse.Namespace) -> ServingEngine:
    per_token = 2 * model.config.n_layers * model.config.d_model * model.dtype.itemsize
    return ServingEngine(model, tok, EngineConfig(kv_cache_bytes=args.kv_tokens * per_token,
                                                  async_scheduling=not args.sync),
                         model_name="mpt-7b-storywriter (random weights)")


def tasks_flow(model: Mpt, tok: Tokenizer, docs: list, args: argparse.Namespace) -> dict[str, Any]:
    serving = new_engine(model, tok, args)
    recorder = Recorder(serving, force_full=True)
    engine = MptEngine(recorder, model="mpt-7b-storywriter", embedding_model=None, prompt_family="completion")
    jobs = {"summarize": {"max_tokens": args.summary_tokens}, "qa": {"questions": list(QUESTIONS)},
            "classify": validate_params("classify", {})}
    try:
        warm = DocRunner(engine, recorder, jobs, args.inflight)
        recorder.max_new_cap = 4
        # imports, lazy init (not measured), on a shuffled copy: nothing left in the prefix cache to reuse
        warm.run([(dict(docs[0][0], name="warm"), shuffled(docs[0][1]))], budget_s=1.0, grace_s=600)
        recorder.max_new_cap = None
        runner = DocRunner(engine, recorder, jobs, args.inflight)
        meter, jobs_meter = StepMeter(serving, args.profile), JobMeter(runner, args.profile)
        t0 = meter.t0 = time.perf_counter()
        run = runner.run([(dict(m, name="run:" + m["name"]), d) for m, d in docs], budget_s=1.0, grace_s=600)
        wall = time.perf_counter() - t0
    finally:
        serving.shutdown()
    out = {"wall_s": round(wall, 3), **meter.summary(),
           "job_cpu_s": {k: round(v, 3) for k, v in jobs_meter.cpu_s.items()},
           "tasks_s": {r["name"]: r["tasks"] for r in run["per_document"]}, "errors": len(run["errors"])}
    if args.profile:
        out["engine_profile"] = meter.top()
        out["jobs_profile"] = jobs_meter.top()
    return out


def decode_loop(model: Mpt, tok: Tokenizer, docs: list, args: argparse.Namespace) -> dict[str, Any]:
    """The same generation shapes without the task layer: per document that fits, one 256-token and
    three 64-token generations on the document's ids (prompts distinct in their last tokens)."""
    serving = new_engine(model, tok, args)
    try:
        meter = StepMeter(serving, False)
        futures = []
        t0 = meter.t0 = time.perf_counter()
        for _, doc in docs:
            ids = tok.encode(doc.full_text)
            if len(ids) + SUMMARY_TOKENS + 64 > serving.scheduler.num_blocks * serving.scheduler.block_size:
                continue
            for i, n in enumerate((args.summary_tokens, 64, 64, 64)):
                params = SamplingParams(max_new_tokens=n, greedy=True, stop_at_eos=False)
                futures.append(serving.submit(GenerateRequest([*ids, 100 + i, 200 + i], params)))
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    finally:
        serving.shutdown()
    return {"wall_s": round(wall, 3), **meter.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--corpus-json", default=str(DEFAULT_OUT))
    ap.add_argument("--docs", default=",".join(DOCS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-tokens", type=int, default=27400,
                    help="the KV pool (the H200 run's 13.4 GiB held 27.4K MPT-7B tokens: the 38K document fails)")
    ap.add_argument("--real-attention", dest="stub_attention", action="store_false",
                    help="keep the real attention kernels (default on CUDA; on CPU they are stubbed)")
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--summary-tokens", type=int, default=SUMMARY_TOKENS)
    ap.add_argument("--sync", action="store_true", help="EngineConfig(async_scheduling=False)")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the engine thread and the job threads")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.cuda else "cpu")
    if device.type == "cuda":
        args.stub_attention = False
    if args.stub_attention:
        stub_attention()
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if device.type == "cpu":
        torch.set_num_threads(1)
    tok = Tokenizer.from_dir(Path(args.tokenizer))
    _, corpus = load_corpus(Path(args.corpus_json))
    by_name = {m["name"]: (m, d) for m, d in corpus}
    docs = [by_name[n] for n in args.docs.split(",")]
    model = build_model(args, max(50432, tok.vocab_size), device)
    res: dict[str, Any] = {"args": vars(args), "switch_interval_s": __import__("sys").getswitchinterval()}
    res["tasks"] = tasks_flow(model, tok, docs, args)
    if not args.skip_decode:
        res["decode"] = decode_loop(model, tok, docs, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tasks_host.json").write_text(json.dumps(res, indent=1, default=str))
    for key in ("tasks", "decode"):
        if key in res:
            print(key, json.dumps({k: v for k, v in res[key].items() if not k.endswith("profile")}, default=str))
    if args.profile:
        print(res["tasks"]["engine_profile"][:6000])
        print(res["tasks"]["jobs_profile"][:6000])


if __name__ == "__main__":
    main()
