"""Persistence: SQLAlchemy models, sessions, repositories and the blob store."""
