"""A private Redis server for tests that restart the broker: the shared server on :6379 serves every
other test, so it must never be restarted or flushed.

`redis-server` (the Debian package) on a free port with a temp working directory. No persistence by
default (`--save "" --appendonly no`): a restart loses every message, the harder case for the
service, which must then recover its work from the database alone.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures_workers import free_port


class PrivateRedis:
    """One redis-server on a fixed port; start() and stop() may be called any number of times (a restart)."""

    def __init__(self, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (install the redis-server package)")
        self._binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="longdoc-redis-"))
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> None:
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"private redis did not start:\n{self.log()[-2000:]}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM, as an operator's restart: the server closes every client connection and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_redis(appendonly: bool = False) -> Iterator[PrivateRedis]:
    server = PrivateRedis(appendonly)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
