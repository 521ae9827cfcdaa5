"""Injected dependencies: settings, a DB session per request, the calling API key, the blob store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from longdoc.settings import Settings
from storage import keys
from storage.blobs import BlobStore
from storage.db import get_sessionmaker
from storage.models import ApiKey

_bearer = HTTPBearer(auto_error=False, description="An API key from `longdoc keys create NAME`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    """One session per request; routes commit explicitly (and enqueue only after that commit)."""
    session = get_sessionmaker(settings.effective_database_url)()
    try:
        yield session
    finally:
        session.close()  # rolls back whatever the route did not commit


def current_key(
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey | None:
    """The authenticated key, or None when auth is switched off (logged at startup)."""
    if not settings.auth_enabled:
        return None
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing `Authorization: Bearer <API key>` header", challenge)
    key = keys.authenticate(session, credentials.credentials)
    if key is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key", challenge)
    return key


def owner_id(key: Annotated[ApiKey | None, Depends(current_key)]) -> uuid.UUID | None:
    """Whose rows this request may see: the key's id, or None (rows without an owner) with auth off."""
    return key.id if key is not None else None


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
OwnerDep = Annotated[uuid.UUID | None, Depends(owner_id)]
