"""The per-process cache of verified API keys, and how a revocation reaches it in every API process.

A key verified once is trusted for `auth_cache_s` (the job poll then costs no key lookup). A revocation
must still stop it at once everywhere: `storage.keys.revoke_key` sends a Postgres NOTIFY with the key's
hash in the revoking transaction (delivered when it commits), and each API process LISTENs on one
connection of its own (RevocationListener) and drops that key from its cache. While the listener is
not connected (startup, a database restart) a missed revocation cannot be ruled out, so the cache is
off: every request checks its key against the database, and the cache starts empty once the listener
is back. SQLite (embedded) has no NOTIFY: there the cache stays off, a lookup is a local file read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import psycopg

from storage.keys import REVOKED_CHANNEL

log = logging.getLogger(__name__)

# Seconds between attempts to (re)connect the listener while the database is unreachable.
RECONNECT_S = 1.0


@dataclass(frozen=True)
class CurrentKey:
    id: uuid.UUID
    name: str


class KeyCache:
    """Keys verified recently, by secret hash, for ttl_s seconds. Only hits are cached, so a new key
    works at once. Serves nothing while `live` is False (no revocation listener connected)."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.live = False
        self._entries: dict[str, tuple[CurrentKey, float]] = {}
        self._lock = threading.Lock()
        # Bumped by every eviction: a lookup that started before one must not put its answer back
        # (it may have read the key just before the revocation committed).
        self.generation = 0

    def get(self, digest: str) -> CurrentKey | None:
        if not self.live:
            return None
        entry = self._entries.get(digest)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, digest: str, key: CurrentKey, generation: int) -> None:
        if self.ttl_s <= 0 or not self.live:
            return
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (key, time.monotonic() + self.ttl_s)

    def evict(self, digest: str | None = None) -> None:
        """Forget one key (by secret hash), or every key."""
        with self._lock:
            self.generation += 1
            if digest is None:
                self._entries.clear()
            else:
                self._entries.pop(digest, None)


class RevocationListener:
    """LISTENs for revoked key hashes on its own connection and evicts them from the cache."""

    def __init__(self, connect_kwargs: dict, cache: KeyCache) -> None:
        self.connect_kwargs, self.cache = connect_kwargs, cache
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="longdoc-key-revocations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(**self.connect_kwargs, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {REVOKED_CHANNEL}")
                    self.cache.evict()  # whatever was revoked while we were not listening
                    self.cache.live = True
                    log.info("key cache on: listening for revocations")
                    async for notify in conn.notifies():
                        self.cache.evict(notify.payload)
            except psycopg.Error as exc:
                if self.cache.live:
                    log.warning("key cache off (every request checks its key) until the revocation "
                                "listener reconnects: %s", exc.__class__.__name__)
            finally:
                self.cache.live = False
                self.cache.evict()
            await asyncio.sleep(RECONNECT_S)
