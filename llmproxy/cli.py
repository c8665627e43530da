"""
The ``llmproxy`` command: database maintenance outside the daemon.

    llmproxy migrate up [REVISION]       apply migrations (default: newest)
    llmproxy migrate down [REVISION]     undo migrations (default: one step)
    llmproxy migrate status              current and newest schema revision
    llmproxy migrate encrypt             encrypt plaintext provider keys
    llmproxy migrate encrypt-status      count encrypted and plaintext keys

It reads the daemon's environment variables (``DB_DRIVER``,
``DATABASE_PATH``, ``DATABASE_URL``, ``ENCRYPTION_KEY``) but does not need
``MANAGEMENT_TOKEN``. Bad configuration prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO

import sqlalchemy as sa

from llmproxy.config import Config, ConfigError
from llmproxy.crypto import ENCRYPTED_PREFIX, KeyCipher
from llmproxy.store import schema
from llmproxy.store.sql import (
    SQLStore,
    cipher_from_config,
    current_revision,
    engine_from_config,
    head_revision,
    migrate,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmproxy", description="llmproxy maintenance commands (the daemon runs under twistd)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mig = commands.add_parser("migrate", help="database schema and encryption")
    actions = mig.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="apply migrations")
    up.add_argument("revision", nargs="?", default="head")
    down = actions.add_parser("down", help="undo migrations")
    down.add_argument("revision", nargs="?", default="-1")
    down.add_argument(
        "--yes", action="store_true", help="confirm a downgrade that drops every table"
    )
    actions.add_parser("status", help="show the schema revision")
    actions.add_parser("encrypt", help="encrypt plaintext provider keys with ENCRYPTION_KEY")
    actions.add_parser("encrypt-status", help="count encrypted and plaintext provider keys")
    return parser


def run(argv: Sequence[str], environ: Mapping[str, str], out: IO[str], err: IO[str]) -> int:
    """Run one command; return the exit status."""
    args = _parser().parse_args(list(argv))
    try:
        config = Config.from_env(environ, require_management_token=False)
        cipher = cipher_from_config(config)  # a bad ENCRYPTION_KEY fails here
        if args.action in _READ_ONLY and _no_sqlite_file(config):
            # Asking about a database that does not exist must not create it
            # (nor its directory): the answers are those of an empty one.
            return _empty_schema(args.action, out)
        engine = engine_from_config(config)
    except ConfigError as e:
        err.write(f"llmproxy: configuration error: {e}\n")
        return 1
    try:
        return _migrate(args, cipher, engine, out, err)
    except ConfigError as e:
        err.write(f"llmproxy: configuration error: {e}\n")
        return 1
    except (sa.exc.SQLAlchemyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err.write(f"llmproxy: database error: {type(e).__name__}: {first}\n")
        return 1
    finally:
        engine.dispose()


#: Commands that only read, or have nothing to do on an empty schema.
_READ_ONLY = ("status", "encrypt-status", "down")


def _no_sqlite_file(config: Config) -> bool:
    path = config.database_path
    return (
        config.db_driver not in ("postgres", "mysql")
        and path != ":memory:"
        and not os.path.exists(path)
    )


def _empty_schema(action: str, out: IO[str]) -> int:
    """What a read-only command says of an empty schema (no database file)."""
    if action == "status":
        out.write(f"current: base\nnewest: {head_revision()}\nmigrations pending\n")
    elif action == "encrypt-status":
        out.write("schema is empty\n")
    else:
        out.write("schema is empty; nothing to undo\n")
    return 0


def _migrate(
    args: argparse.Namespace,
    cipher: KeyCipher | None,
    engine: sa.Engine,
    out: IO[str],
    err: IO[str],
) -> int:
    head = head_revision()
    if args.action == "up":
        migrate(engine, args.revision)
        out.write(f"schema at revision {current_revision(engine) or 'base'}\n")
    elif args.action == "down":
        current = current_revision(engine)
        if current is None:
            out.write("schema is empty; nothing to undo\n")
            return 0
        drops_all = args.revision == "base" or (args.revision == "-1" and current == "0001")
        if drops_all and not args.yes:
            err.write(
                "llmproxy: this downgrade drops every table and all data; "
                "repeat with --yes to confirm\n"
            )
            return 1
        migrate(engine, args.revision, down=True)
        out.write(f"schema at revision {current_revision(engine) or 'base'}\n")
    elif args.action == "status":
        current = current_revision(engine)
        state = "up to date" if current == head else "migrations pending"
        out.write(f"current: {current or 'base'}\nnewest: {head}\n{state}\n")
    elif args.action == "encrypt":
        if cipher is None:
            err.write("llmproxy: configuration error: ENCRYPTION_KEY: required to encrypt keys\n")
            return 1
        store = SQLStore(engine, reactor=None, cipher=cipher)
        store.prepare()
        count = store.encrypt_existing_keys()
        out.write(f"encrypted {count} provider key(s)\n")
    elif args.action == "encrypt-status":
        if current_revision(engine) is None:
            out.write("schema is empty\n")
            return 0
        api_key = schema.projects.c.api_key
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).where(api_key != "")).scalar_one()
            encrypted = conn.execute(
                sa.select(sa.func.count()).where(api_key.like(ENCRYPTED_PREFIX + "%"))
            ).scalar_one()
        out.write(f"provider keys: {encrypted} encrypted, {total - encrypted} plaintext\n")
    return 0


def main() -> None:
    """Console script entry point."""
    sys.exit(run(sys.argv[1:], os.environ, sys.stdout, sys.stderr))
