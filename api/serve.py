"""`longdoc serve --workers N`: N uvicorn processes, each listening on its own SO_REUSEPORT socket.

Not uvicorn's own `workers=`: there the processes share one listening socket and whichever is awake
accepts a burst of connections, so long-lived keep-alive connections (a proxy's upstream pool, a
poller) stay where that burst put them: bench/api_load.py's 16 connections, opened together, split
about 1:4, 4:1 and 0:1 between two workers in three runs (by worker CPU time). With SO_REUSEPORT the kernel spreads connections over
the sockets by a hash of their addresses. Each process builds the app from the same LONGDOC_* settings
(`api.app:create_app`). Linux (and BSDs) only, like SO_REUSEPORT.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger(__name__)


def serve_workers(workers: int, host: str, port: int, log_level: str, log_config: dict[str, Any]) -> int:
    """Run until SIGTERM/SIGINT (0) or until a worker dies (1: the others are stopped, so a supervisor
    such as Docker restarts the whole server instead of it running short-handed)."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(host, port, log_level, log_config), name=f"longdoc-api-{i}")
                 for i in range(workers)]
    for process in processes:
        process.start()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)  # uvicorn shuts down gracefully on it

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wait([p.sentinel for p in processes])  # returns once any worker exits
    if not stopping:
        dead = [p for p in processes if not p.is_alive()]
        log.error("API worker %s exited (code %s); stopping the others", dead[0].name, dead[0].exitcode)
        stop(signal.SIGTERM, None)
        stopping = False
    for process in processes:
        process.join(60)
    return 0 if stopping else 1


def _worker(host: str, port: int, log_level: str, log_config: dict[str, Any]) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    config = uvicorn.Config("api.app:create_app", factory=True, log_level=log_level, log_config=log_config)
    uvicorn.Server(config).run(sockets=[sock])
