"""Service commands: db, keys, serve, worker (and later run, batch)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Filled in by the service-foundation work (issue 2)."""
