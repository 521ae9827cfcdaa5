"""`longdoc keys revoke` reaches every API process at once: two `longdoc serve` processes with a long
key cache keep serving a key revoked behind their back (proof that they cache it), and stop the key
that the CLI revokes as soon as the command returns (a Postgres NOTIFY evicts it in each process).
A listener that loses its connection turns the cache off and starts it empty."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import psutil
from sqlalchemy import create_engine, text

from config.settings import Settings, get_settings
from longdoc.cli import main as longdoc_main
from storage import keys
from storage.db import session_scope
from tests.fixtures_workers import free_port, serve_process, settings_env, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTEN_SQL = f"LISTEN {keys.REVOKED_CHANNEL}"


def _revoke_silently(url: str, key_id: uuid.UUID) -> None:
    """What no API process hears about: the row changes, no NOTIFY (as a revocation missed while a
    listener was disconnected would be)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE api_keys SET revoked_at = now() WHERE id = :id"), {"id": key_id})
    engine.dispose()


def _listeners(url: str) -> list[int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        pids = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND query = :q"), {"q": LISTEN_SQL}).scalars().all()
    engine.dispose()
    return list(pids)


def test_cli_revocation_stops_a_cached_key_in_every_process_at_once(migrated_pg, api_redis_url, tmp_path,
                                                                   monkeypatch):
    port = free_port()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=migrated_pg,
                        broker_url=api_redis_url, api_port=port, api_workers=2, auth_cache_s=600)
    with session_scope(migrated_pg) as s:
        (shadow, shadow_secret), (target, target_secret) = keys.create_key(s, "shadow"), keys.create_key(s, "target")
        shadow_id, target_id = shadow.id, target.id
    env = settings_env(settings)
    with serve_process(env, REPO_ROOT, tmp_path / "serve.log", port, "longdoc serve --workers 2") as (server, base):
        wait_for(lambda: len(_listeners(migrated_pg)) == 2, 20, what="both processes listening for revocations")
        # 8 keep-alive connections per key, opened together: SO_REUSEPORT spreads them over both processes.
        clients = {secret: [httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=10)
                            for _ in range(8)] for secret in (shadow_secret, target_secret)}
        try:
            for http in [c for group in clients.values() for c in group]:
                assert http.get("/v1/jobs").status_code == 200  # verified once: now cached
            workers = [p for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            held = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in w.net_connections())
                    for w in workers]
            assert len(held) == 2 and min(held) >= 1, held

            _revoke_silently(migrated_pg, shadow_id)
            assert {http.get("/v1/jobs").status_code for http in clients[shadow_secret]} == {200}  # the cache serves

            # The real command, in this process (a subprocess would only add its start-up).
            for name, value in env.items():
                if name.startswith("LONGDOC_"):
                    monkeypatch.setenv(name, value)
            get_settings.cache_clear()
            try:
                assert longdoc_main(["keys", "revoke", str(target_id)]) == 0
            finally:
                get_settings.cache_clear()
            revoked_at = time.monotonic()
            # Every connection, in both processes: 401 as soon as the command has returned. A NOTIFY is
            # delivered after the commit, asynchronously; allow its milliseconds, never the cache's 600 s.
            for http in clients[target_secret]:
                statuses = []
                while not statuses or statuses[-1] != 401:
                    statuses.append(http.get("/v1/jobs").status_code)
                    assert time.monotonic() - revoked_at < 1.0, statuses
                assert http.get("/v1/jobs").status_code == 401
            lag = time.monotonic() - revoked_at
        finally:
            for http in [c for group in clients.values() for c in group]:
                http.close()
    assert lag < 1.0


def test_a_listener_that_reconnects_starts_with_an_empty_cache(api_settings, make_client, make_key):
    url = api_settings.effective_database_url
    client = make_client(api_settings.model_copy(update={"auth_cache_s": 600}))
    wait_for(lambda: len(_listeners(url)) == 1, 10, what="the revocation listener")
    header = make_key("reconnect")
    assert client.get("/v1/jobs", headers=header).status_code == 200
    with session_scope(url) as s:
        key_id = keys.authenticate(s, header["Authorization"].removeprefix("Bearer ")).id
    _revoke_silently(url, key_id)
    assert client.get("/v1/jobs", headers=header).status_code == 200  # cached, and no NOTIFY came

    (old,) = _listeners(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": old})
    engine.dispose()
    # While it is down, or once it is back, the cache may hold nothing it could have missed.
    wait_for(lambda: _listeners(url) and _listeners(url) != [old], 10, what="the listener to reconnect")
    assert client.get("/v1/jobs", headers=header).status_code == 401
