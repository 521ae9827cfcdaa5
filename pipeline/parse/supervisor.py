"""Parent side of containment: a pool of long-lived parser child processes.

Each parse_file call checks out one idle child (starting one if none is idle), sends the request,
and waits at most limits.timeout_s for the reply. A child that overruns is killed (SIGKILL) and
replaced; a child that dies (memory limit hit inside a C library, a crash) is reported as this
document's failure and replaced. The calling worker and every other document go on.

Children are reused across documents because starting Python and importing PDFium per document
would cost more than parsing most documents. A child is retired once its peak RSS passes half
its memory limit, so one big document does not leave the next one short.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.parse.extract import ParseLimits
from pipeline.types import PageText, ParsedDocument, PipelineError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0
RETIRE_AFTER_DOCUMENTS = 500
# Signals a C library raises when an allocation fails under RLIMIT_AS (PDFium traps on OOM).
_ALLOCATION_FAILURE_SIGNALS = {signal.SIGABRT, signal.SIGTRAP, signal.SIGILL, signal.SIGBUS}


class _ChildDied(Exception):
    pass


class ParserUnavailable(RuntimeError):
    """The parser child cannot be started: a broken installation, not a bad document."""


class _Child:
    def __init__(self, test_hooks: bool) -> None:
        argv = [sys.executable, "-m", "pipeline.parse.child"] + (["--test-hooks"] if test_hooks else [])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.documents = 0
        self.max_rss_kb = 0
        self._buffer = b""
        try:
            ready = self.read_reply(time.monotonic() + STARTUP_TIMEOUT_S)
        except (TimeoutError, _ChildDied, ValueError) as exc:
            self.kill()
            raise ParserUnavailable(f"the parser child process did not start ({type(exc).__name__}); "
                                    "see the worker's stderr") from exc
        if not ready.get("ready"):
            self.kill()
            raise ParserUnavailable(f"the parser child sent {ready!r} instead of ready")

    def send(self, request: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, OSError) as exc:
            raise _ChildDied from exc

    def read_reply(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                raise TimeoutError
            data = os.read(fd, 1 << 20)
            if not data:
                raise _ChildDied
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        return self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None


class ParserPool:
    """Thread-safe pool of parser children; one document at a time per child."""

    def __init__(self, *, test_hooks: bool = False) -> None:
        self._test_hooks = test_hooks
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self.peak_child_rss_kb = 0  # largest peak RSS any child reported (benchmark figure)
        self.child_cpu_seconds = 0.0  # CPU time children spent on documents (benchmark figure)

    def parse(self, path: Path, *, password: str | None = None, extractor: str = "pdfium",
              limits: ParseLimits, hook: str | None = None) -> ParsedDocument:
        request = {"path": str(Path(path).resolve()), "password": password, "extractor": extractor,
                   "limits": {"max_pages": limits.max_pages, "timeout_s": limits.timeout_s,
                              "memory_mb": limits.memory_mb, "max_bytes": limits.max_bytes}}
        if hook:
            request["hook"] = hook
        child = self._checkout()
        try:
            child.send(request)
            reply = child.read_reply(time.monotonic() + limits.timeout_s)
        except TimeoutError:
            child.kill()
            raise PipelineError("parse_timeout", f"parsing took longer than {limits.timeout_s:g} s; "
                                "the parser was stopped") from None
        except _ChildDied:
            raise self._died(child, limits) from None
        except BaseException:
            child.kill()  # interrupted mid-document: its reply would confuse the next caller
            raise
        self._checkin(child, reply, limits)
        if not reply["ok"]:
            raise PipelineError(reply["code"], reply["message"])
        doc = reply["doc"]
        return ParsedDocument(media_type=doc["media_type"], pages=[PageText(**p) for p in doc["pages"]],
                              warnings=doc["warnings"])

    def _died(self, child: _Child, limits: ParseLimits) -> PipelineError:
        status = child.kill()
        sig = -status if status < 0 else None
        name = signal.Signals(sig).name if sig else f"exit status {status}"
        log.warning("parser child died (%s) while parsing a document", name)
        if sig in _ALLOCATION_FAILURE_SIGNALS or sig == signal.SIGKILL:
            return PipelineError("parse_memory", f"the parser stopped ({name}), most likely at the "
                                 f"{limits.memory_mb} MB memory limit")
        return PipelineError("parse_error", f"the parser crashed on this file ({name})")

    def _checkout(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
                child.kill()
        return _Child(self._test_hooks)

    def _checkin(self, child: _Child, reply: dict, limits: ParseLimits) -> None:
        child.documents += 1
        child.max_rss_kb = max(child.max_rss_kb, reply.get("max_rss_kb", 0))
        with self._lock:
            self.peak_child_rss_kb = max(self.peak_child_rss_kb, child.max_rss_kb)
            self.child_cpu_seconds += reply.get("cpu_seconds", 0.0)
        worn_out = (reply.get("fatal") or child.documents >= RETIRE_AFTER_DOCUMENTS
                    or child.max_rss_kb * 1024 > limits.memory_mb * 1024 * 1024 // 2)
        if worn_out or not child.alive():
            child.kill()
            return
        with self._lock:
            self._idle.append(child)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()


_default_pool: ParserPool | None = None
_default_lock = threading.Lock()


def default_pool() -> ParserPool:
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = ParserPool()
            atexit.register(_default_pool.close)
        return _default_pool


def parse_file(path: Path, *, password: str | None = None, extractor: str = "pdfium",
               limits: ParseLimits) -> ParsedDocument:
    """Parse one document in a contained child process; see the package docstring.

    Raises PipelineError(code, message) for every per-document failure; nothing else for bad input.
    """
    return default_pool().parse(path, password=password, extractor=extractor, limits=limits)
