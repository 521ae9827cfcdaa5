"""The FastAPI application factory: `uvicorn --factory api.app:create_app` or `longdoc serve`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy.exc
from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.errors import BodyLimitMiddleware, install_error_handlers
from api.key_cache import KeyCache, RevocationListener
from api.metrics import Metrics, MetricsMiddleware
from api.routes import documents, health, jobs
from config.settings import Settings, get_settings
from storage import migrate
from storage.blobs import BlobStore
from storage.db import POOL_SIZE
from storage.hot_reads import HotReads, psycopg_connect_kwargs

log = logging.getLogger(__name__)

# Room for the multipart envelope and the text fields next to a file of max_upload_bytes.
FORM_OVERHEAD_BYTES = 1024 * 1024
JSON_BODY_LIMIT_BYTES = 1024 * 1024
# The revocation listener's connection: bounded connects, and TCP keepalives so a silently dead
# connection (not just a closed one) is noticed in ~25 s and the key cache turns off meanwhile.
LISTENER_CONNECT_ARGS = {"connect_timeout": 5, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def check_database(settings: Settings) -> None:
    """Refuse to serve an unmigrated database; tolerate an unreachable one (503s until it is back).

    The embedded default (SQLite under data_dir, no LONGDOC_DATABASE_URL) belongs to this install, so
    it is migrated here instead: the API works right after `pip install`.
    """
    url = settings.effective_database_url
    try:
        if settings.database_url is None:
            migrate.upgrade(url)
        migrate.assert_up_to_date(url)
    except migrate.DatabaseNotMigrated as exc:
        log.error("%s", exc)
        raise
    except sqlalchemy.exc.OperationalError as exc:
        log.warning("database %s unreachable at startup (%s): requests answer 503 until it is back",
                    migrate.safe_url(url), exc.__class__.__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not settings.auth_enabled:
        log.warning("AUTH IS OFF (LONGDOC_AUTH_ENABLED=false): every request is served without an API key; "
                    "keep this server on localhost")
    app.state.blobs.root.mkdir(parents=True, exist_ok=True)
    # Sync routes and DB calls run in this loop's thread pool, each holding a pooled connection; more
    # threads than the pool keeps would open and close an overflow connection per request under load.
    to_thread.current_default_thread_limiter().total_tokens = POOL_SIZE
    await run_in_threadpool(check_database, settings)
    await app.state.hot_reads.open()
    if app.state.revocations is not None:
        app.state.revocations.start()
    log.info("longdoc API ready (%s mode, database %s)", "embedded" if settings.embedded else "service",
             migrate.safe_url(settings.effective_database_url))
    try:
        yield
    finally:
        if app.state.revocations is not None:
            await app.state.revocations.stop()
        await app.state.hot_reads.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="longdoc", version="1", lifespan=lifespan,
                  description="Long-document summarization, question answering and classification.")
    app.state.settings = settings
    app.state.blobs = BlobStore(settings.effective_blob_dir)
    app.state.metrics = Metrics(settings)
    # Verified keys are cached only where a revocation can reach every process at once (Postgres
    # NOTIFY; api/key_cache.py); on SQLite each request checks its key.
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    listen_kwargs = psycopg_connect_kwargs(settings.effective_database_url)
    app.state.revocations = None if listen_kwargs is None else RevocationListener(
        {**listen_kwargs, **LISTENER_CONNECT_ARGS}, app.state.key_cache)
    app.state.hot_reads = HotReads(settings.effective_database_url)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, upload_path="/v1/documents",
                       upload_limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
                       default_limit=JSON_BODY_LIMIT_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for module in (documents, jobs, health):
        app.include_router(module.router)
    return app
