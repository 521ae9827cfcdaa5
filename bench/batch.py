"""CPU benchmark: `longdoc batch` (embedded, extractive engine) over the corpus vs `longdoc run` per file.

Measures on this machine, same files, same tasks (summarize, one question, classify by document type):
- batch: wall time, files/s and pages/s, in this process (longdoc.batch.runner.Batch, as the command
  runs it), and the batch's own overhead (walk + hash, journal writes + fsync + compaction, progress
  display) against the per-file work (parse + tasks, summed from the records);
- a second batch over the same results file (everything already done): the cost of a no-op re-run;
- baseline: `longdoc run FILE --json` as a subprocess per file, one at a time (what a user loops over).

    python bench/batch.py [--corpus ../shared/corpus] [--limit N] [--no-baseline] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
TASK_ARGS = ["--question", "Who are the parties?"]


def run_batch(settings, root: Path, out: Path, concurrency: int) -> dict:  # noqa: ANN001 (Settings)
    from longdoc.batch.display import PlainDisplay
    from longdoc.batch.embedded import EmbeddedBackend
    from longdoc.batch.passwords import Passwords
    from longdoc.batch.request import build_request
    from longdoc.batch.runner import Batch, BatchOptions
    from longdoc.batch.stop import StopSignals
    request = build_request(None, question=TASK_ARGS[1:])
    backend = EmbeddedBackend(settings, request, Passwords(), concurrency)
    options = BatchOptions(root=root, out=out, fmt="jsonl", journal_path=out)
    with StopSignals() as stop:
        batch = Batch(options, request, backend, PlainDisplay(), stop)
        started = time.perf_counter()
        status = batch.run()
        wall = time.perf_counter() - started
    return {"status": status, "wall_s": wall, "overhead_s": dict(batch.overhead), "tally": batch.tally}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--limit", type=int, default=None, help="only the first N files (sorted)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the `longdoc run` per-file baseline")
    ap.add_argument("--concurrency", type=int, default=2, help="batch parse concurrency")
    args = ap.parse_args()
    from config.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    settings = Settings(_env_file=None, engine="extractive", data_dir=tmp / "data")
    env = {**os.environ, "LONGDOC_ENGINE": "extractive", "LONGDOC_DATA_DIR": str(tmp / "data")}  # for `longdoc run`
    root = args.corpus
    if args.limit:
        root = tmp / "corpus"
        files = sorted(p for p in args.corpus.rglob("*") if p.is_file())[: args.limit]
        for p in files:
            (root / p.relative_to(args.corpus)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, root / p.relative_to(args.corpus))
    out = tmp / "results.jsonl"

    first = run_batch(settings, root, out, args.concurrency)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    work = sum(r["timings"].get("parse_s", 0) + sum(r["timings"].get("tasks_s", {}).values()) for r in records)
    pages = sum(r.get("pages") or 0 for r in records if r["status"] == "ok")
    overhead = sum(first["overhead_s"].values())
    again = run_batch(settings, root, out, args.concurrency)
    report = {
        "files": len(records), "ok": sum(r["status"] == "ok" for r in records), "pages": pages,
        "concurrency": args.concurrency, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
        "batch": {"wall_s": round(first["wall_s"], 1), "files_per_s": round(len(records) / first["wall_s"], 3),
                  "pages_per_s": round(pages / first["wall_s"], 2),
                  "per_file_work_s": round(work, 1),
                  "overhead_s": {k: round(v, 3) for k, v in first["overhead_s"].items()},
                  "overhead_of_work": round(overhead / work, 4), "overhead_of_wall": round(overhead / first["wall_s"], 4)},
        "rerun_nothing_to_do_s": round(again["wall_s"], 2),
    }
    if not args.no_baseline:
        started = time.perf_counter()
        failures = 0
        for r in sorted(records, key=lambda r: r["path"]):
            proc = subprocess.run([sys.executable, "-m", "longdoc.cli", "--log-level", "WARNING", "run",
                                   str(root / r["path"]), "--json", *TASK_ARGS], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            failures += proc.returncode != 0
        wall = time.perf_counter() - started
        report["run_one_at_a_time"] = {"wall_s": round(wall, 1), "files_per_s": round(len(records) / wall, 3),
                                       "pages_per_s": round(pages / wall, 2), "nonzero_exits": failures}
        report["batch_speedup"] = round(wall / first["wall_s"], 2)
    report["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
