"""The lease a task body holds on its row, renewed by a heartbeat thread while the body works."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def worker_id() -> str:
    """host:pid:thread, recorded on a claimed job so an operator can find the process that holds it."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


class Lease:
    """Extends a lease every lease_s/3 in a daemon thread; `lost` is set once the claim is no longer ours."""

    def __init__(self, extend: Callable[[], bool], lease_s: float, what: str) -> None:
        self._extend, self._interval, self._what = extend, max(0.2, lease_s / 3), what
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{what}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._extend():
                    log.warning("%s: claim lost (canceled, re-queued or deleted)", self._what)
                    self.lost.set()
                    return
            except Exception as exc:  # a DB blip: keep trying; the lease covers a few missed beats
                log.warning("%s: heartbeat failed: %s", self._what, exc)
