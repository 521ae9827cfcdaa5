"""`longdoc batch DIR`: every document under DIR, embedded (default) or through a running service.

Exit status: 0 every file ok; 1 at least one file failed (its record says why); 2 a usage or
configuration error (nothing or only part processed: bad options, an engine that cannot load, an API
key the service refuses, the results file in use); 130 stopped by Ctrl-C / SIGTERM before the end
(run the same command again to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from longdoc.commands.run import (
    add_engine_options,
    add_task_options,
    load_passwords,
    request_for,
    settings_for,
)

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "md")


def register(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="process every document under a folder (resumable)")
    batch.add_argument("dir", type=Path)
    add_task_options(batch)
    batch.add_argument("--include", action="append", default=[], help="only paths matching GLOB (repeatable)")
    batch.add_argument("--exclude", action="append", default=[], help="skip paths matching GLOB (repeatable)")
    batch.add_argument("--out", type=Path, default=None,
                       help="results file (default: results.FORMAT here); the JSONL journal is this file "
                            "for jsonl, else OUT.journal.jsonl beside it")
    batch.add_argument("--format", choices=FORMATS, default=None, help="default: from --out's suffix, else jsonl")
    batch.add_argument("--api", default=None, metavar="URL", help="use the longdoc service at URL instead")
    batch.add_argument("--api-key", default=None, help="API key for --api")
    batch.add_argument("--concurrency", type=int, default=None,
                       help="documents parsed at once (embedded; default LONGDOC_EMBEDDED_WORKERS) or "
                            "in flight at the service (--api; default 4)")
    batch.add_argument("--retry-failed", action="store_true", help="process files that failed before again")
    batch.add_argument("--progress", choices=("auto", "live", "plain"), default="auto",
                       help="live display (terminal) or log lines; auto: live when stderr is a terminal")
    add_engine_options(batch)
    batch.set_defaults(func=cmd_batch)


def output_paths(out: Path | None, fmt: str | None) -> tuple[Path, str, Path]:
    """(results file, format, journal file)."""
    if fmt is None:
        suffix = out.suffix.lstrip(".").lower() if out else ""
        fmt = suffix if suffix in FORMATS else "jsonl"
    out = out or Path(f"results.{fmt}")
    journal = out if fmt == "jsonl" else out.with_name(out.name + ".journal.jsonl")
    return out, fmt, journal


def cmd_batch(args: argparse.Namespace) -> int:
    from longdoc.batch.display import make_display, print_summary
    from longdoc.batch.journal import JournalBusy, NotAJournal
    from longdoc.batch.runner import EXIT_USAGE, Batch, BatchFatal, BatchOptions
    from longdoc.batch.stop import StopSignals

    request, passwords = request_for(args), load_passwords(args.password_file)
    if request is None or passwords is None:
        return EXIT_USAGE
    if not args.dir.is_dir():
        print(f"error: {args.dir}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    if args.concurrency is not None and args.concurrency < 1:
        print("error: --concurrency must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if bool(args.api) != bool(args.api_key):
        print("error: --api and --api-key go together", file=sys.stderr)
        return EXIT_USAGE
    settings = settings_for(args)
    out, fmt, journal = output_paths(args.out, args.format)
    options = BatchOptions(root=args.dir, out=out, fmt=fmt, journal_path=journal, include=args.include,
                           exclude=args.exclude, retry_failed=args.retry_failed)
    if args.api:
        from longdoc.batch.remote import RemoteBackend

        backend = RemoteBackend(args.api, args.api_key, request, passwords, args.concurrency or 4)
    else:
        from longdoc.batch.embedded import EmbeddedBackend

        backend = EmbeddedBackend(settings, request, passwords, args.concurrency or settings.embedded_workers)
    display = make_display(None if args.progress == "auto" else args.progress == "live")
    with StopSignals() as stop:
        batch = Batch(options, request, backend, display, stop)
        try:
            backend.check()
            status = batch.run()
        except (BatchFatal, JournalBusy, NotAJournal) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:  # the results file cannot be written (a directory, no space, read-only)
            print(f"error: {exc.filename or options.out}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    print_summary(batch.tally, stopped=stop.requested.is_set())
    log.debug("batch overhead: %s", dict(batch.overhead))
    print(f"results: {out}" + (f" (journal {journal})" if journal != out else ""))
    return status
