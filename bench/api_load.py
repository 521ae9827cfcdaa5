"""API load benchmark: job-status polls/s (p50/p99) and upload MB/s + server memory, against a real
`longdoc serve` on Postgres holding N jobs.

    python bench/api_load.py                     # 10,000 jobs, 10 s of polling, 10 MB and 50 MB uploads
    python bench/api_load.py --duration 20 --concurrency 32 --upload-mb 10 50 100
    python bench/api_load.py --workers 2          # `longdoc serve --workers 2`
    python bench/api_load.py --storm 200 --workers 2   # only the upload storm (bench/upload_storm.py)

Everything runs on loopback: a throwaway Postgres database (dropped at the end), Redis db 12 as the
broker (service mode; no worker consumes it), the server as a subprocess, and the load generator as a
separate process (a minimal keep-alive HTTP/1.1 client, so the client costs little of the shared CPU).
Baseline in the same run: GET /healthz (same server, no auth, no DB) is the framework's ceiling here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BROKER = "redis://127.0.0.1:6379/12"
SAMPLE_PDF = REPO.parent / "shared" / "corpus" / "contract-ivillage-sponsorship.pdf"


# --- load generator (runs in its own process: `api_load.py _load ...`) -------------------------


async def _poll_worker(
    port: int, paths: list[str], token: str, stop_at: float, out: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    rng = random.Random()
    while time.perf_counter() < stop_at:
        request = f"GET {rng.choice(paths)} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        out.append(time.perf_counter() - start)
        if head[9:12] != b"200":
            errors.append(int(head[9:12]))
    writer.close()


async def _load(
    port: int, paths: list[str], token: str, duration: float, concurrency: int, warmup: float
) -> dict:
    await asyncio.gather(
        *[_poll_worker(port, paths, token, time.perf_counter() + warmup, [], []) for _ in range(concurrency)]
    )
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(
        *[_poll_worker(port, paths, token, start + duration, latencies, errors) for _ in range(concurrency)]
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed),
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "non_200": len(errors),
    }


def load_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--paths", required=True, help="file with one path per line")
    p.add_argument("--token", default="")
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    a = p.parse_args(argv)
    paths = Path(a.paths).read_text().split()
    print(json.dumps(asyncio.run(_load(a.port, paths, a.token, a.duration, a.concurrency, a.warmup))))


# --- set-up: database with N jobs, server subprocess -------------------------------------------


def make_database(n_jobs: int) -> tuple[str, str, list[uuid.UUID]]:
    from sqlalchemy import create_engine, insert, text

    from storage import keys, migrate
    from storage.db import session_scope
    from storage.models import Document, DocumentStatus, Job, JobStatus, Result, utcnow

    name = f"longdoc_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate.upgrade(url)
    now = utcnow()
    with session_scope(url) as session:
        key, secret = keys.create_key(session, "bench")
        docs = [
            {
                "id": uuid.uuid4(),
                "owner_id": key.id,
                "filename": f"doc{i}.pdf",
                "sha256": f"{i:064x}",
                "bytes": 100_000,
                "media_type": "application/pdf",
                "status": DocumentStatus.parsed,
                "pages": 40,
                "tokens": 30_000,
                "warnings": [],
                "parse_attempts": 1,
                "created_at": now,
                "updated_at": now,
            }
            for i in range(max(1, n_jobs // 100))
        ]
        session.execute(insert(Document), docs)
        statuses = [JobStatus.succeeded, JobStatus.queued, JobStatus.running, JobStatus.failed]
        jobs = []
        for i in range(n_jobs):
            status = statuses[i % len(statuses)]
            jobs.append(
                {
                    "id": uuid.uuid4(),
                    "document_id": docs[i % len(docs)]["id"],
                    "owner_id": key.id,
                    "task": "qa",
                    "params": {"questions": ["What is the term?"]},
                    "status": status,
                    "progress": 1.0 if status == JobStatus.succeeded else 0.4,
                    "stage": "decode",
                    "attempts": 1,
                    "created_at": now - timedelta(seconds=n_jobs - i),
                    "updated_at": now,
                    "started_at": now,
                    "finished_at": now if status == JobStatus.succeeded else None,
                }
            )
        session.execute(insert(Job), jobs)
        session.execute(
            insert(Result),
            [
                {
                    "job_id": j["id"],
                    "created_at": now,
                    "payload": {
                        "answers": [
                            {
                                "question": "What is the term?",
                                "answer": "Two years from the effective date.",
                                "citations": [{"page": 3, "quote": "two (2) years"}],
                            }
                        ]
                    },
                }
                for j in jobs
                if j["status"] == JobStatus.succeeded
            ],
        )
    return url, secret, [j["id"] for j in jobs]


def drop_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    from storage.db import get_engine

    get_engine.cache_clear()
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, port: int, data_dir: Path, max_upload: int, workers: int = 1) -> subprocess.Popen:
    env = {
        **os.environ,
        "LONGDOC_DATABASE_URL": url,
        "LONGDOC_BROKER_URL": BROKER,
        "LONGDOC_DATA_DIR": str(data_dir),
        "LONGDOC_MAX_UPLOAD_BYTES": str(max_upload),
        "LONGDOC_API_HOST": "127.0.0.1",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "longdoc.cli", "--log-level", "WARNING", "serve", "--port", str(port),
         "--workers", str(workers)],
        cwd=REPO,
        env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not become healthy in 60 s")


def _server_processes(pid: int) -> list:
    """The server and its worker processes (`--workers N`)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def server_cpu_s(pid: int) -> float:
    return sum(t.user + t.system for t in (p.cpu_times() for p in _server_processes(pid)))


def run_load(port: int, pid: int, paths: list[str], token: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Polls from a separate process. Also reports the server's CPU time per request, which (unlike
    requests/s) does not depend on how busy the shared cores are."""
    path_file = tmp / f"paths-{len(paths)}.txt"
    path_file.write_text("\n".join(paths))
    cpu_before, wall_before = server_cpu_s(pid), time.perf_counter()
    command = [sys.executable, __file__, "_load", "--port", str(port), "--paths", str(path_file), "--token", token,
               "--duration", str(args.duration), "--concurrency", str(args.concurrency)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 120, check=True)
    result = json.loads(out.stdout)
    cpu, wall = server_cpu_s(pid) - cpu_before, time.perf_counter() - wall_before
    # the load process warms up for 2 s before its measured `duration`; the server's CPU covers both
    total_requests = result["requests"] * (1 + 2 / args.duration)
    result["server_cpu_us_per_request"] = round(cpu / total_requests * 1e6)
    result["server_cpu_share"] = round(cpu / wall, 2)
    with open("/proc/loadavg") as f:
        result["loadavg_1m_after"] = float(f.read().split()[0])
    return result


# --- uploads: MB/s and server RSS while streaming -----------------------------------------------


def rss_mb(pid: int) -> float:
    """Summed over the server's processes: growth is that of whichever worker took the upload."""
    return sum(p.memory_info().rss for p in _server_processes(pid)) / 2**20


def upload_once(port: int, token: str, path: Path) -> tuple[float, int, str]:
    """Stream a multipart upload from disk over a raw socket (flat client memory); returns
    (seconds, status, document id)."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        f"Content-Type: application/pdf\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    request = (
        f"POST /v1/documents HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, path.open("rb") as f:
        s.sendall(request + head)
        while chunk := f.read(1 << 20):
            s.sendall(chunk)
        s.sendall(tail)
        response = b""
        while data := s.recv(65536):
            response += data
    elapsed = time.perf_counter() - start
    status = int(response[9:12])
    body = json.loads(response.split(b"\r\n\r\n", 1)[1]) if status in (200, 201) else {}
    return elapsed, status, body.get("id", "")


def measure_upload(port: int, pid: int, token: str, size_mb: int, tmp: Path) -> dict:
    path = tmp / f"upload-{size_mb}mb.pdf"
    seed = SAMPLE_PDF.read_bytes()
    with path.open("wb") as f:  # a real PDF's bytes, repeated (the API only sniffs the head)
        written = 0
        salt = uuid.uuid4().bytes  # new content each run: no dedupe shortcut
        while written < size_mb * 2**20:
            f.write(seed + salt)
            written += len(seed) + len(salt)
    baseline = rss_mb(pid)
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds, status, doc_id = upload_once(port, token, path)
    stop.set()
    sampler.join()
    mb = path.stat().st_size / 2**20
    path.unlink()
    return {
        "size_mb": round(mb, 1),
        "status": status,
        "seconds": round(seconds, 3),
        "mb_per_s": round(mb / seconds, 1),
        "rss_before_mb": round(baseline, 1),
        "rss_peak_mb": round(peak[0], 1),
        "rss_growth_mb": round(peak[0] - baseline, 1),
        "document_id": doc_id,
    }


def run_storm(port: int, token: str, url: str, uploads: int) -> dict:
    """16 clients, then (the same-run baseline) 1 client on new bytes; each checked for duplicates,
    lost uploads and errors, and against the database's document count."""
    from sqlalchemy import func, select

    from bench.upload_storm import problems, salted_files, storm
    from storage.db import session_scope
    from storage.models import Document

    files, out = max(1, uploads // 4), {}
    for name, clients, salt in (("clients_16", 16, "a"), ("clients_1", 1, "b")):
        contents = salted_files(SAMPLE_PDF.read_bytes() + salt.encode(), files)
        with session_scope(url) as s:
            before = s.scalar(select(func.count()).select_from(Document))
        result = asyncio.run(storm(f"http://127.0.0.1:{port}", token, contents, 4, clients, key_prefix=name))
        with session_scope(url) as s:
            added = s.scalar(select(func.count()).select_from(Document)) - before
        out[name] = {**result.figures(), "documents_added": added, "problems": problems(result)[:10]}
    out["ratio_uploads_per_s"] = round(out["clients_16"]["uploads_per_s"] / out["clients_1"]["uploads_per_s"], 2)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        return load_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured polling per run")
    p.add_argument("--concurrency", type=int, default=16, help="keep-alive connections of the load process")
    p.add_argument("--upload-mb", type=int, nargs="*", default=[10, 50])
    p.add_argument("--workers", type=int, default=1, help="`longdoc serve --workers N`")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--storm", type=int, default=0, metavar="N",
                   help="run only the upload storm: N uploads (4 copies of N/4 files), 16 clients, then 1 client")
    args = p.parse_args()
    if args.storm:
        args.jobs = 1

    t0 = time.time()
    url, token, job_ids = make_database(args.jobs)
    print(f"database with {len(job_ids)} jobs ready in {time.time() - t0:.1f} s", file=sys.stderr)
    results: dict = {"jobs_in_db": len(job_ids), "concurrency": args.concurrency, "duration_s": args.duration,
                     "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="longdoc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        server = start_server(url, port, tmp / "data", max_upload=max(args.upload_mb or [1]) * 2**20 + 2**24,
                              workers=args.workers)
        try:
            if args.storm:
                results["upload_storm"] = run_storm(port, token, url, args.storm)
                return
            results["baseline_healthz"] = run_load(port, server.pid, ["/healthz"], "", args, tmp)
            sample = random.Random(0).sample(job_ids, min(2000, len(job_ids)))
            results["job_polls"] = run_load(port, server.pid, [f"/v1/jobs/{j}" for j in sample], token, args, tmp)
            results["uploads"] = [measure_upload(port, server.pid, token, mb, tmp) for mb in args.upload_mb]
        finally:
            server.terminate()
            server.wait(timeout=30)
            drop_database(url)
            text = json.dumps(results, indent=2)
            print(text)
            if args.json:
                args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
