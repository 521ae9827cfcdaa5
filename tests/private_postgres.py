"""A private Postgres server for tests that stop and start the database (an outage): the shared server
on :5432 serves every other test, so it must never be stopped.

initdb + pg_ctl from the Debian packages (/usr/lib/postgresql/<version>/bin) on a temp dir and a free
port, trust auth, durability off (the data is thrown away). Postgres refuses to run as root, so as root
the commands run as the `postgres` user and the directory is handed to it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures_workers import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found under /usr/lib/postgresql/*/bin (install the postgresql package)")
    return found[-1]


class PrivatePostgres:
    """One initdb'd cluster; start() and stop() may be called any number of times (an outage)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="longdoc-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-w", "-s", "-o", options,
                  "-l", str(self.root / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects every client and shuts down cleanly, as a restart by an operator does;
        `immediate` is a crash."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-w", "-s", "-m", mode, "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
