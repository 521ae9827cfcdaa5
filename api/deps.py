"""Injected dependencies: settings, a DB session per request, the calling API key, the blob store.

Dependencies without I/O are `async def`: FastAPI runs sync ones in the thread pool, a hop each,
which is a measurable share of a job poll (bench/api_load.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.key_cache import CurrentKey, KeyCache
from config.settings import Settings
from storage import keys
from storage.blobs import BlobStore
from storage.db import get_read_sessionmaker, get_sessionmaker

_bearer = HTTPBearer(auto_error=False, description="An API key from `longdoc keys create NAME`.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


async def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> AsyncIterator[Session]:
    """One session per request; routes commit explicitly (and enqueue only after that commit).

    Creating a Session does no I/O; closing one that holds a transaction does (the rollback), so only
    that close goes to the thread pool.
    """
    session = get_sessionmaker(settings.effective_database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_read_session(settings: Annotated[Settings, Depends(get_settings)]) -> AsyncIterator[Session]:
    """A session for GET routes: each SELECT runs in autocommit, so there is no BEGIN/ROLLBACK round
    trip, and closing it does no I/O (it stays on the event loop). Used by the job poll, the hot path."""
    session = get_read_sessionmaker(settings.effective_database_url)()
    try:
        yield session
    finally:
        session.close()


def _lookup_key(settings: Settings, secret: str) -> CurrentKey | None:
    with get_sessionmaker(settings.effective_database_url)() as session:
        key = keys.authenticate(session, secret)
        return CurrentKey(key.id, key.name) if key is not None else None


async def current_key(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> CurrentKey | None:
    """The authenticated key, or None when auth is switched off (logged at startup)."""
    if not settings.auth_enabled:
        return None
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing `Authorization: Bearer <API key>` header", challenge)
    cache: KeyCache = request.app.state.key_cache
    digest = keys.hash_secret(credentials.credentials)
    key = cache.get(digest)
    if key is None:
        generation = cache.generation
        key = await run_in_threadpool(_lookup_key, settings, credentials.credentials)
        if key is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key", challenge)
        cache.put(digest, key, generation)
    return key


async def owner_id(key: Annotated[CurrentKey | None, Depends(current_key)]) -> uuid.UUID | None:
    """Whose rows this request may see: the key's id, or None (rows without an owner) with auth off."""
    return key.id if key is not None else None


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
OwnerDep = Annotated[uuid.UUID | None, Depends(owner_id)]
