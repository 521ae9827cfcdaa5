"""The `longdoc` command. Each command group lives in longdoc/commands/ and registers itself here.

Heavy imports (torch, the API app) happen inside the command functions, so `longdoc --help` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from longdoc.commands import admin as admin_commands
from longdoc.commands import batch as batch_commands
from longdoc.commands import model as model_commands
from longdoc.commands import run as run_commands
from longdoc.commands import service as service_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longdoc", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    admin_commands.register(sub)
    service_commands.register(sub)
    model_commands.register(sub)
    run_commands.register(sub)
    batch_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
