"""Concurrent uploads and polls against a running API: the scenario of tests/test_reliability_load.py
(bounded) and of `bench/api_load.py --storm N` (the figures in bench/RESULTS.md).

`clients` asyncio tasks, each with its own keep-alive connection, take uploads from one queue. The
uploads are `copies` of each of `len(contents)` distinct files; half of them carry an Idempotency-Key
(one key per file, so a key is never reused for other bytes) and every one asks for a summarize job:
an upload without a key adds one, a keyed replay is answered with the job its key already has.
The copies of half of the files are queued back to back, so several clients send the same bytes at the
same moment (the races dedupe must survive); the rest are shuffled. After each upload the client polls
the document and the job it got. What the caller checks: one document id per file, `created` exactly
once per file, every upload and poll answered 2xx, one job per upload.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx


@dataclass
class StormResult:
    uploads: int
    elapsed_s: float
    statuses: Counter = field(default_factory=Counter)  # upload status -> count
    poll_statuses: Counter = field(default_factory=Counter)
    ids_by_file: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    created_by_file: Counter = field(default_factory=Counter)
    job_ids: list[str] = field(default_factory=list)
    keyed_job_ids: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))  # file -> jobs answered under its key
    upload_s: list[float] = field(default_factory=list)
    poll_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # transport errors, bodies of non-2xx answers

    def figures(self) -> dict:
        def pct(values: list[float], p: float) -> float:
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1) if ordered else 0.0

        return {"uploads": self.uploads, "files": len(self.ids_by_file), "elapsed_s": round(self.elapsed_s, 2),
                "uploads_per_s": round(self.uploads / self.elapsed_s, 1),
                "upload_p50_ms": pct(self.upload_s, 0.5), "upload_p99_ms": pct(self.upload_s, 0.99),
                "polls": len(self.poll_s), "poll_p50_ms": pct(self.poll_s, 0.5), "poll_p99_ms": pct(self.poll_s, 0.99),
                "upload_statuses": dict(self.statuses), "poll_statuses": dict(self.poll_statuses)}


def plan(files: int, copies: int, seed: int = 0, key_prefix: str = "storm") -> list[tuple[int, str | None]]:
    """The upload queue: (file index, Idempotency-Key or None). A new key_prefix per set of files: a
    key used again for other bytes is (rightly) a 409."""
    rng = random.Random(seed)
    together = [[(f, None) for _ in range(copies)] for f in range(files // 2)]
    shuffled = [(f, None) for f in range(files // 2, files) for _ in range(copies)]
    rng.shuffle(shuffled)
    queue = [item for group in together for item in group] + shuffled
    return [(f, f"{key_prefix}-file-{f}" if i % 2 == 0 else None) for i, (f, _) in enumerate(queue)]


async def _client(base_url: str, token: str, contents: list[bytes], queue: asyncio.Queue,
                  result: StormResult) -> None:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        while not queue.empty():
            index, key = queue.get_nowait()
            headers = {"Idempotency-Key": key} if key else {}
            start = time.perf_counter()
            try:
                r = await http.post("/v1/documents", headers=headers, data={"tasks": "summarize"},
                                    files={"file": (f"file-{index}.pdf", contents[index], "application/pdf")})
            except httpx.HTTPError as exc:
                result.failures.append(f"upload of file {index}: {exc!r}")
                continue
            result.upload_s.append(time.perf_counter() - start)
            result.statuses[r.status_code] += 1
            if r.status_code not in (200, 201):
                result.failures.append(f"upload of file {index}: {r.status_code} {r.text[:300]}")
                continue
            body = r.json()
            result.ids_by_file[index].add(body["id"])
            result.created_by_file[index] += body["created"]
            result.job_ids.extend(job["id"] for job in body["jobs"])
            if key:
                result.keyed_job_ids[index].update(job["id"] for job in body["jobs"])
            for path in (f"/v1/documents/{body['id']}", *(f"/v1/jobs/{job['id']}" for job in body["jobs"])):
                start = time.perf_counter()
                try:
                    p = await http.get(path)
                except httpx.HTTPError as exc:
                    result.failures.append(f"poll {path}: {exc!r}")
                    continue
                result.poll_s.append(time.perf_counter() - start)
                result.poll_statuses[p.status_code] += 1
                if p.status_code != 200:
                    result.failures.append(f"poll {path}: {p.status_code} {p.text[:300]}")


async def storm(base_url: str, token: str, contents: list[bytes], copies: int, clients: int = 16,
                seed: int = 0, key_prefix: str = "storm") -> StormResult:
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan(len(contents), copies, seed, key_prefix):
        queue.put_nowait(item)
    result = StormResult(uploads=queue.qsize(), elapsed_s=0.0)
    start = time.perf_counter()
    await asyncio.gather(*[_client(base_url, token, contents, queue, result) for _ in range(clients)])
    result.elapsed_s = time.perf_counter() - start
    return result


def salted_files(seed_bytes: bytes, files: int) -> list[bytes]:
    """`files` distinct documents: one real file's bytes with a distinct tail each (sniffed the same)."""
    return [seed_bytes + f"\n%storm {i}\n".encode() for i in range(files)]


def problems(result: StormResult) -> list[str]:
    """What would be a duplicate document, a lost upload or an error; empty when the storm held."""
    found = list(result.failures)
    for index, ids in sorted(result.ids_by_file.items()):
        if len(ids) != 1:
            found.append(f"file {index}: {len(ids)} documents {sorted(ids)}")
        if result.created_by_file[index] != 1:
            found.append(f"file {index}: created {result.created_by_file[index]} times")
    answered = sum(result.statuses.values())
    if answered != result.uploads:
        found.append(f"{result.uploads - answered} uploads got no answer")
    if len(result.job_ids) != result.statuses[200] + result.statuses[201]:
        found.append(f"{len(result.job_ids)} job ids for {answered} uploads")
    # A job id may come back twice only as a replay: uploads of one file under its Idempotency-Key are
    # answered with a job that request already has; every other upload asked for new work.
    seen = Counter(result.job_ids)
    replays = {j for ids in result.keyed_job_ids.values() for j in ids}
    repeated = sorted(j for j, n in seen.items() if n > 1 and j not in replays)
    if repeated:
        found.append(f"job ids answered to more than one request that were not replays: {repeated}")
    shared = [f for f, ids in result.keyed_job_ids.items() for g, other in result.keyed_job_ids.items()
              if f < g and ids & other]
    if shared:
        found.append(f"one job answered under the keys of different files: {shared}")
    return found
