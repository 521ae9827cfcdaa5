"""`longdoc run FILE`: one document, in this process, on the embedded default; results printed.

Exit status: 0 every task succeeded; 1 the file (or a task on it) failed, the error said plainly;
2 a usage or configuration error (bad options, an engine that cannot run here); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """The task options `run` and `batch` share. Task names come from pipeline.tasks."""
    from pipeline.tasks import TASKS

    parser.add_argument("--tasks", default=None,
                        help=f"comma list of {','.join(TASKS)} (default: every task whose options are "
                             "complete; --question implies qa, --labels classify)")
    parser.add_argument("--question", action="append", default=[], help="a question for qa (repeatable)")
    parser.add_argument("--labels", default=None, help="comma list of labels for classify")
    parser.add_argument("--max-words", type=int, default=None, help="summary length in words")
    parser.add_argument("--password-file", type=Path, default=None,
                        help="passwords for encrypted PDFs: one per line, or GLOB<TAB>PASSWORD per line")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("auto", "mpt", "extractive"), default=None,
                        help="default: LONGDOC_ENGINE (auto = MPT with a CUDA GPU and weights, else extractive)")
    parser.add_argument("--model", default=None, help="MPT checkpoint dir or hub id (default: LONGDOC_MODEL)")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="process one file in this process and print its results")
    run.add_argument("file", type=Path)
    add_task_options(run)
    add_engine_options(run)
    run.add_argument("--json", action="store_true", help="print the record as JSON (results as stored)")
    run.set_defaults(func=cmd_run)


def settings_for(args: argparse.Namespace):  # noqa: ANN201 (config.settings.Settings)
    from config.settings import get_settings

    update = {k: v for k, v in (("engine", args.engine), ("model", args.model)) if v is not None}
    return get_settings().model_copy(update=update)


def request_for(args: argparse.Namespace):  # noqa: ANN201 (TaskRequest), or prints why and returns None
    from longdoc.batch.request import RequestError, build_request

    try:
        return build_request(args.tasks, question=args.question, labels=args.labels, max_words=args.max_words)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def load_passwords(path: Path | None):  # noqa: ANN201 (Passwords), or None after printing why
    from longdoc.batch.passwords import Passwords

    try:
        return Passwords.load(path)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read --password-file {path}: {exc}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from longdoc.batch import local, render
    from longdoc.batch.records import fail, new_record
    from longdoc.batch.walk import scan_file
    from pipeline.parse.supervisor import ParserUnavailable
    from pipeline.types import PipelineError

    request, passwords = request_for(args), load_passwords(args.password_file)
    if request is None or passwords is None:
        return 2
    settings = settings_for(args)
    path: Path = args.file
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    scanned = scan_file(path.name, path)
    record = new_record(scanned, request.key(scanned.sha256) if scanned.sha256 else None)
    record["path"] = str(path)
    try:
        if scanned.error:
            fail(record, *scanned.error)
            doc = None
        else:
            doc = local.parse_into(record, path, settings, passwords.candidates(path.name))
        if doc is not None:
            engine = local.load_engine(settings)
            local.run_tasks(engine, request, record, doc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PipelineError as exc:  # the engine cannot load: configuration, not this file
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except (LookupError, ParserUnavailable) as exc:  # no tokenizer / parser child: the installation
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record, ensure_ascii=False, indent=2))
    elif record["results"]:
        print(render.readable(record))
    error = record.get("error")
    if error:
        task = f" ({error['task']})" if error.get("task") else ""
        print(f"error: {path}{task}: {error['code']}: {error['message']}", file=sys.stderr)
        return 1
    return 0
