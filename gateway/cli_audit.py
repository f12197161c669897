"""``kzg-gateway audit verify|export``: works without the server running.

``verify`` exits 0 when the chain verifies and 1 when it does not, naming the first
bad sequence number; 2 when the source cannot be read. It says whether the public keys
were pinned (``--key``) or read from the source itself, which proves much less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit.checkpoints import Checkpoint
from audit.export import export_lines
from audit.retention import RetentionPolicy
from audit.signing import key_bytes
from audit.verify import VerifyReport, verify_database, verify_export_lines

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2
DATABASE_URL_ENV = "KZG_GATEWAY_DATABASE_URL"
DEFAULT_DATABASE_FILE = "gateway.db"
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def register(subparsers: Any) -> None:
    """Add the ``audit`` command group to the top-level CLI."""
    audit = subparsers.add_parser("audit", help="verify or export the audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser("verify", help="verify the hash chain, checkpoints and anchors")
    _add_source(verify, allow_export=True)
    verify.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY_ID=HEX",
        help="pin a receipt public key (repeatable); replaces the keys the source carries",
    )
    verify.add_argument(
        "--checkpoint",
        type=Path,
        help="an earlier checkpoint (JSON, as GET /v1/audit/checkpoints/latest returns it) "
        "that the chain must extend",
    )
    verify.add_argument(
        "--keep-years",
        type=int,
        metavar="N",
        help="the retention policy: refuse anchors that pruned records younger than N years",
    )
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")
    verify.set_defaults(func=run_verify)

    export = commands.add_parser("export", help="write the JSON Lines export")
    _add_source(export, allow_export=False)
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")
    export.set_defaults(func=run_export)


def _add_source(parser: argparse.ArgumentParser, allow_export: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    if allow_export:
        source.add_argument("--export", type=Path, metavar="FILE", help="a JSON Lines export")
    source.add_argument("--db-url", metavar="URL", help="database URL (SQLite or PostgreSQL)")
    source.add_argument("--data-dir", type=Path, metavar="D", help="the gateway's data directory")


def async_url(url: str) -> str:
    """Return ``url`` with the async driver the gateway uses for its dialect."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    return f"{_ASYNC_DRIVERS.get(scheme, scheme)}://{rest}"


def data_dir_database_url(data_dir: Path) -> str:
    """Return the database URL a gateway with this data directory uses:
    ``KZG_GATEWAY_DATABASE_URL``, else ``database_url`` in ``<data dir>/config.toml``,
    else the embedded default, the SQLite file ``<data dir>/gateway.db``."""
    url = os.environ.get(DATABASE_URL_ENV)
    config = data_dir / "config.toml"
    if not url and config.is_file():
        with config.open("rb") as handle:
            url = tomllib.load(handle).get("database_url")
    if url:
        return async_url(url)
    database = data_dir / DEFAULT_DATABASE_FILE
    if not database.is_file():
        raise ValueError(f"no gateway database in {data_dir} (expected {database})")
    return f"sqlite+aiosqlite:///{database.resolve()}"


def _database_url(args: argparse.Namespace) -> str:
    if args.db_url:
        return async_url(args.db_url)
    return data_dir_database_url(args.data_dir)


def _pinned_keys(pairs: list[str]) -> dict[str, bytes] | None:
    if not pairs:
        return None
    keys: dict[str, bytes] = {}
    for pair in pairs:
        key_id, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--key expects KEY_ID=HEX, got {pair!r}")
        keys[key_id] = key_bytes(value)
    return keys


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        yield from handle


async def _with_engine(url: str, work: Any) -> Any:
    engine: AsyncEngine = create_async_engine(url)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


def _verify(args: argparse.Namespace) -> VerifyReport:
    keys = _pinned_keys(args.key)
    held = None
    if args.checkpoint is not None:
        held = Checkpoint.from_mapping(json.loads(args.checkpoint.read_text(encoding="utf-8")))
    floor = None
    if args.keep_years is not None:
        floor = RetentionPolicy(args.keep_years).cutoff(datetime.now(UTC))
    if args.export is not None:
        return verify_export_lines(_lines(args.export), keys, held, floor)
    return asyncio.run(
        _with_engine(_database_url(args), lambda engine: verify_database(engine, keys, held, floor))
    )


_KEYS_NOTE = {
    "pinned": "signatures checked against the pinned keys",
    "database": "signatures checked against keys read from the database being verified "
    "(pin them with --key to prove more)",
    "export": "signatures checked against keys read from the export being verified "
    "(pin them with --key to prove more)",
}


def run_verify(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        report = _verify(args)
    except (OSError, ValueError, KeyError, SQLAlchemyError) as exc:
        print(f"audit verify: cannot read the source: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
    elif report.valid:
        print(
            f"audit chain valid: {report.checked} records checked, head seq {report.head_seq} "
            f"hash {report.head_hash}, {report.checkpoints} checkpoints, {report.anchors} anchors; "
            f"{_KEYS_NOTE[report.keys_source]}",
            file=out,
        )
    else:
        print(
            f"audit chain INVALID: first bad seq {report.first_bad_seq}: {report.reason} "
            f"({report.checked} records verified before it)",
            file=out,
        )
    return EXIT_VALID if report.valid else EXIT_INVALID


async def _export(url: str, out: TextIO) -> int:
    async def work(engine: AsyncEngine) -> int:
        count = 0
        async for line in export_lines(engine, datetime.now(UTC)):
            out.write(line)
            count += 1
        return count

    return await _with_engine(url, work)


def run_export(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        url = _database_url(args)
        if args.output is None:
            asyncio.run(_export(url, out))
        else:
            with args.output.open("w", encoding="utf-8") as handle:
                asyncio.run(_export(url, handle))
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"audit export: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    return EXIT_VALID
