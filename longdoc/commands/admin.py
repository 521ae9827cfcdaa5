"""Admin commands: `longdoc db upgrade|downgrade|current`, `longdoc keys create|list|revoke`.

They act on settings.effective_database_url (LONGDOC_DATABASE_URL, or the embedded SQLite file).
"""

from __future__ import annotations

import argparse
import sys
import uuid


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="database migrations").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="migrate the database to the newest (or given) revision")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    down = db.add_parser("downgrade", help="migrate the database back to REV (e.g. base, 0001, -1)")
    down.add_argument("revision")
    down.set_defaults(func=cmd_db_downgrade)
    db.add_parser("current", help="print the database's revision and the code's head").set_defaults(
        func=cmd_db_current)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key and print its secret (shown only this once)")
    create.add_argument("name")
    create.set_defaults(func=cmd_keys_create)
    keys.add_parser("list", help="list keys (never their secrets)").set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser(
        "revoke", help="revoke a key by id; it stops working at once",
        description="Revoke a key by id. It stops working as soon as this command returns, in every API "
                    "process: on Postgres each process is told by a NOTIFY and drops the key from its key "
                    "cache (LONGDOC_AUTH_CACHE_S), and a process not listening (its database connection "
                    "is being re-made) checks every request's key against the database meanwhile; on "
                    "SQLite (embedded) keys are not cached.")
    revoke.add_argument("id", type=uuid.UUID)
    revoke.set_defaults(func=cmd_keys_revoke)


def _url() -> str:
    from config.settings import get_settings

    return get_settings().effective_database_url


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from storage import migrate

    migrate.upgrade(_url(), args.revision)
    print(f"database at {migrate.current(_url())}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from storage import migrate

    migrate.downgrade(_url(), args.revision)
    print(f"database at {migrate.current(_url()) or 'base (empty)'}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from storage import migrate

    at, head = migrate.current(_url()), migrate.head()
    print(f"database: {at or 'none (run `longdoc db upgrade`)'}\ncode head: {head}")
    return 0 if at == head else 1


def _checked_session():  # noqa: ANN202 (a context manager yielding a Session)
    from config.settings import get_settings
    from storage import migrate
    from storage.db import session_scope

    if get_settings().database_url is None:  # the embedded SQLite file is ours: migrate it, as serve does
        migrate.upgrade(_url())
    try:
        migrate.assert_up_to_date(_url())
    except migrate.DatabaseNotMigrated as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    return session_scope(_url())


def cmd_keys_create(args: argparse.Namespace) -> int:
    from storage import keys

    with _checked_session() as session:
        key, secret = keys.create_key(session, args.name)
        key_id = key.id
    print(f"created key {key_id} ({args.name}). Its secret is shown only now; store it safely:")
    print(secret)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from storage import keys

    with _checked_session() as session:
        rows = keys.list_keys(session)
        print(f"{'id':36}  {'prefix':10}  {'created':25}  {'status':8}  name")
        for key in rows:
            status = "revoked" if key.revoked_at else "active"
            print(f"{key.id!s:36}  {key.prefix:10}  {key.created_at.isoformat(timespec='seconds'):25}  "
                  f"{status:8}  {key.name}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from storage import keys

    with _checked_session() as session:
        key = keys.revoke_key(session, args.id)
    if key is None:
        print(f"error: no key {args.id}", file=sys.stderr)
        return 1
    print(f"revoked key {args.id}")
    return 0
