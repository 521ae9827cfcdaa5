"""The parser child process: `python -m pipeline.parse.child`.

Reads one JSON request per line on stdin, parses that document under an address-space limit
(RLIMIT_AS) and writes one JSON reply per line on stdout. JSON, not pickle, so that a child
subverted by a hostile file can hand the parent nothing but data. The parent (supervisor.py)
enforces the time limit by killing this process.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.parse.extract import ParseLimits, parse_in_process
from pipeline.types import PipelineError

# Test hooks run only in a child started with --test-hooks (ParserPool(test_hooks=True) in tests;
# workers never): they prove the time and memory limits on demand.
_hooks_enabled = False


def _run_hook(name: str) -> None:
    if name == "spin":
        while True:
            pass
    if name == "allocate":
        hog = []
        while True:
            hog.append(bytearray(64 * 1024 * 1024))


def _set_memory_limit(memory_mb: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def handle(request: dict) -> dict:
    limits = ParseLimits(**request["limits"])
    _set_memory_limit(limits.memory_mb)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        if _hooks_enabled and request.get("hook"):
            _run_hook(request["hook"])
        doc = parse_in_process(Path(request["path"]), password=request.get("password"),
                               extractor=request.get("extractor", "pdfium"), limits=limits)
        reply = {"ok": True, "doc": asdict(doc)}
    except PipelineError as exc:
        reply = {"ok": False, "code": exc.code, "message": exc.message}
    except MemoryError:
        reply = {"ok": False, "code": "parse_memory", "fatal": True,
                 "message": f"parsing needed more than the {limits.memory_mb} MB memory limit"}
    except RecursionError:
        reply = {"ok": False, "code": "parse_error", "message": "the document nests objects too deeply"}
    except Exception as exc:  # noqa: BLE001 - any library failure on hostile input is this document's error
        reply = {"ok": False, "code": "parse_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
    reply["seconds"] = time.perf_counter() - started
    reply["cpu_seconds"] = time.process_time() - cpu_started
    reply["max_rss_kb"] = _peak_rss_kb()
    return reply


def _peak_rss_kb() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big worker would
    # report the worker's peak as its own.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    global _hooks_enabled
    _hooks_enabled = "--test-hooks" in sys.argv[1:]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # pypdf logs every repaired object of a broken file; that is noise in a worker's log.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        reply = handle(json.loads(line))
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
        if reply.get("fatal"):
            return  # a process that hit its memory limit may be in a bad state: start afresh


if __name__ == "__main__":
    main()
