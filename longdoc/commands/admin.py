"""Admin commands: `longdoc db upgrade|downgrade|current`, `longdoc keys create|list|revoke`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Filled in by the service-foundation work (issue 2): storage + API side."""
