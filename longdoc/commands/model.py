"""Model commands: `longdoc model init`, `longdoc generate`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Filled in by the engine work (issue 4)."""
