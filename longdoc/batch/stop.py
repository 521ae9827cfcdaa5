"""Ctrl-C and SIGTERM for a batch: the first asks it to stop, the second abandons it at once.

The signals are blocked in every thread (and so in the parser child processes, which inherit the
mask): a terminal's Ctrl-C reaches the whole foreground process group, and a parser child killed by
it would turn the document it was reading into a bogus `parse_error`. One thread takes the signals
with sigtimedwait instead. First signal: `requested` is set; the runner starts no new file, lets the files
in flight finish (or, with a service, leaves them to the next run, which resumes their jobs) and
writes its outputs. Second signal: the process exits at once with status 130; the journal needs no
clean-up (each record is one fsynced line; a torn one is dropped when the journal is next opened).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = {signal.SIGINT, signal.SIGTERM}
INTERRUPTED_EXIT = 130
POLL_S = 0.2  # the watcher's sigtimedwait timeout: how soon it notices the run is over


class StopSignals:
    def __init__(self) -> None:
        self.requested = threading.Event()
        self._old_mask: set[signal.Signals] | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def __enter__(self) -> StopSignals:
        """Call in the main thread before any other thread or parser child starts."""
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        self._thread = threading.Thread(target=self._watch, name="longdoc-signals", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()  # before unblocking: no signal of the run is left to the old handlers
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def _watch(self) -> None:
        while not self._closed.is_set():
            info = signal.sigtimedwait(SIGNALS, POLL_S)
            if info is None:
                continue
            sig = info.si_signo
            if not self.requested.is_set():
                log.warning("%s: stopping after the files in flight (%s again abandons them)",
                            signal.Signals(sig).name, "Ctrl-C" if sig == signal.SIGINT else "the signal")
                self.requested.set()
                continue
            os.write(2, b"\nabandoned: files in flight are left for the next run\n")
            os._exit(INTERRUPTED_EXIT)
