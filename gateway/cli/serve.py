"""``init``, ``serve`` and ``jobs run``: the commands that set up and run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.retention import store_retention_policy
from audit.writer import AuditWriter
from auth.bootstrap import ensure_first_admin
from auth.crypto import (
    MASTER_KEY_ENV,
    MASTER_KEY_FILE,
    MasterKey,
    MasterKeyError,
    load_master_key,
    write_master_key_file,
)
from auth.hashing import HashingBusy
from auth.policy import PolicyError
from auth.service import record_master_key
from gateway.cli import cli_event, common_options
from gateway.config import Config, ConfigError, cli_actor, load_config
from gateway.db import SchemaNotCurrent, check_schema, current_heads, make_engine, migrate
from gateway.identity import policies_for
from gateway.jobs import JobContext, run_job
from gateway.logs import LOG_FORMATS, configure_logging
from gateway.receipts import SEALED_SECRETS, LogKeySigner, ensure_log_key, load_log_signer
from gateway.settings import JOB_NAMES
from gateway.tls import DEV_TLS_DIR, ensure_dev_tls, server_ssl_context, tls_files

log = logging.getLogger("kzg_gateway")


async def _store_retention_floor(config: Config) -> None:
    """The database enforces the retention policy's floor itself; only the schema owner
    may set it, so it is written here, beside the migrations."""
    policy = config.audit.retention()
    owner = make_engine(config.database_owner_url)
    try:
        await store_retention_policy(owner, policy)
    finally:
        await owner.dispose()


def _check_init_settings(config: Config) -> None:
    """On PostgreSQL the gateway runs as a role the migrations grant; without it the
    servers could read nothing."""
    owner = config.database_owner_url
    if not owner.startswith("postgresql") or config.database_app_role:
        return
    if not config.data.get("database_url") or config.database_url != owner:
        raise ConfigError(
            "database_app_role is not set (KZG_GATEWAY_DATABASE_APP_ROLE): on PostgreSQL "
            "the migrations grant that role what the servers need"
        )


async def _current_jwt_kid(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        kid = await conn.execute(text("SELECT kid FROM jwt_keys WHERE status = 'current'"))
        return kid.scalar_one_or_none()


async def _audit_init(
    engine: AsyncEngine, config: Config, master_key: MasterKey, acts: list[tuple[str, dict]]
) -> None:
    """Commit one audit record per act of ``init`` (schema, first admin, first keys),
    attributed to the OS account that ran it; init fails unless they are committed."""
    async with _audit_writer(engine, config, master_key) as (_, writer):
        for action, detail in acts:
            await writer.append(cli_event(f"cli:init_{action}", "success", detail))


@contextlib.asynccontextmanager
async def _audit_writer(
    engine: AsyncEngine, config: Config, master_key: MasterKey
) -> AsyncIterator[tuple[LogKeySigner, AuditWriter]]:
    """The log key and a started writer, as the server would run them."""
    signer = await load_log_signer(engine, master_key, config.audit.origin)
    writer = AuditWriter(engine, signer, commit_timeout=config.audit.commit_timeout_seconds)
    await writer.start()
    try:
        yield signer, writer
    finally:
        await writer.stop()


async def initialise(config: Config) -> dict[str, Any]:
    """Idempotent set-up of a data directory: dirs, master key, schema, dev TLS, log
    key, first admin, each act audited. Returns what ``init --json`` prints (admin only
    when created)."""
    _check_init_settings(config)
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.environ.get(MASTER_KEY_ENV):
        write_master_key_file(data_dir / MASTER_KEY_FILE)
    master_key = load_master_key(data_dir)
    before = await current_heads(config.database_owner_url)
    await migrate(
        config.database_owner_url,
        config.database_app_role,
        auditor_role=config.database_auditor_role,
    )
    acts: list[tuple[str, dict]] = [
        ("schema", {"from": before, "to": await current_heads(config.database_owner_url)})
    ]
    await _store_retention_floor(config)
    database_file = config.init_database_url.partition(":///")[2]
    if config.init_database_url.startswith("sqlite") and Path(database_file).is_file():
        os.chmod(database_file, 0o600)
    ca_cert: Path | None = Path(config.tls.ca_file) if config.tls.ca_file else None
    if not config.tls.cert_file:
        ca_cert = ensure_dev_tls(data_dir / DEV_TLS_DIR).ca_cert
    # The documented PostgreSQL init names the owner URL only: seed through it then.
    engine = make_engine(config.init_database_url)
    admin = None
    try:
        # Before anything is sealed: refuse a key other than the recorded one, and record
        # it for a database that held secrets before the record existed.
        await record_master_key(engine, master_key, SEALED_SECRETS)
        origin = config.audit.origin
        log_key = await ensure_log_key(engine, master_key, origin)
        if log_key is not None:
            acts.append(("log_key", {"key_id": log_key.key_id}))
        kid = await _current_jwt_kid(engine)
        admin = await ensure_first_admin(engine, master_key, *policies_for(config))
        new_kid = await _current_jwt_kid(engine)
        if new_kid != kid:
            acts.append(("jwt_key", {"kid": new_kid}))
        if admin is not None:
            # Who, never the password or TOTP secret.
            acts.append(("first_admin", {"username": admin["username"], "roles": ["admin"]}))
        await _audit_init(engine, config, master_key, acts)
    finally:
        await engine.dispose()
    return {
        "url": config.url,
        "ca_cert": str(ca_cert.resolve()) if ca_cert else None,
        "admin": admin,
    }


def run_init(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.data_dir)
    try:
        result = asyncio.run(initialise(config))
    except (
        SchemaNotCurrent,
        PolicyError,
        SQLAlchemyError,
        OSError,
        ValueError,
        HashingBusy,
    ) as exc:
        # One line naming what failed, never a traceback; of a driver's message only its
        # first line (the details may quote row values).
        print(f"kzg-gateway init: {_describe(exc, 'database_owner_url')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"kzg-gateway initialised in {config.data_dir.resolve()}")
    print(f"  url:     {result['url']}")
    print(f"  CA cert: {result['ca_cert']}")
    if result["admin"]:
        admin = result["admin"]
        print("  first admin (shown once, store it now):")
        print(f"    username:    {admin['username']}")
        print(f"    password:    {admin['password']}")
        print(f"    TOTP secret: {admin['totp_secret']}")
    return 0


async def serve(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, then drain: /readyz turns 503, the listener closes
    after ``[server] drain_seconds``, in-flight requests finish (up to
    ``shutdown_timeout_seconds``), then resources close."""
    from gateway.app import create_app
    from gateway.appkeys import STATE
    from gateway.server import start_server

    master_key = load_master_key(config.data_dir)
    await _check_master_key(config, master_key)
    _check_tls_files(config)
    app = create_app(config, master_key=master_key)
    ssl_context = server_ssl_context(config.tls, config.data_dir)
    runner, _ = await start_server(app, config.host, config.port, ssl_context)
    log.info("kzg-gateway serving on %s", config.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    app[STATE].draining = True
    await asyncio.sleep(config.server.drain_seconds)
    log.info("draining %d in-flight requests", app[STATE].inflight)
    await runner.cleanup()


def _check_tls_files(config: Config) -> None:
    """Name the TLS setting whose file is missing before anything starts (the ssl
    module's error names neither the file nor the setting)."""
    tls = config.tls
    cert_file, key_file = tls_files(tls, config.data_dir)
    files = {"cert_file": cert_file, "key_file": key_file}
    if tls.client_ca_file:
        files["client_ca_file"] = Path(tls.client_ca_file)
    for key, path in files.items():
        if path.is_file():
            continue
        if getattr(tls, key):
            raise ConfigError(f"[tls] {key} {path} does not exist (KZG_GATEWAY_TLS__{key.upper()})")
        raise ConfigError(
            f"no TLS certificate: set [tls] cert_file and key_file, or run 'kzg-gateway "
            f"init' in this data directory for the development certificate ({path})"
        )


async def _check_master_key(config: Config, master_key: MasterKey) -> None:
    """Refuse to serve with a key other than the recorded one (e.g. the old key after a
    rotation), before anything answers; record it if the database has no record yet."""
    engine = make_engine(config.database_url)
    try:
        await check_schema(engine)
        await record_master_key(engine, master_key, SEALED_SECRETS)
    finally:
        await engine.dispose()


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_format)
    try:
        config = load_config(args.config, args.data_dir).with_overrides(
            "server", host=args.host, port=args.port
        )
        # A policy that does not parse is a configuration error too: exit 2 before anything starts.
        policies_for(config)
    except (ConfigError, PolicyError) as exc:
        # Exit 2 like every command's configuration error, in serve's log format.
        log.error("kzg-gateway: %s", exc)
        return 2
    try:
        asyncio.run(serve(config))
    except (
        SchemaNotCurrent,
        MasterKeyError,
        ConfigError,
        PolicyError,
        OSError,
        SQLAlchemyError,
    ) as exc:
        # Through the log handler: every line serve writes is in its log format.
        log.error("kzg-gateway serve: %s", _describe(exc))
        return 1
    return 0


def _describe(exc: BaseException, setting: str = "database_url") -> str:
    """A one-line reason; a database that cannot be reached or refuses the login is named
    by the setting that points at it."""
    if isinstance(exc, SQLAlchemyError):
        origin = getattr(exc, "orig", None) or exc
        lines = str(origin).strip().splitlines()
        return f"database error ({setting}): {lines[0] if lines else type(origin).__name__}"
    if isinstance(exc, ConnectionError | socket.gaierror):
        return f"cannot reach the database ({setting}): {exc}"
    return str(exc)


async def _run_job(config: Config, name: str) -> dict[str, Any]:
    master_key = load_master_key(config.data_dir)
    engine = make_engine(config.database_url)
    try:
        await check_schema(engine)
        async with _audit_writer(engine, config, master_key) as (signer, writer):
            ctx = JobContext(config, engine, writer, master_key, signer, actor=cli_actor())
            return await run_job(name, ctx)
    finally:
        await engine.dispose()


def run_jobs(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.data_dir)
    try:
        summary = asyncio.run(_run_job(config, args.name))
    except KeyError as exc:
        print(f"kzg-gateway jobs run: {exc.args[0]}", file=sys.stderr)
        return 2
    except (ConfigError, MasterKeyError, SchemaNotCurrent, PolicyError) as exc:
        print(f"kzg-gateway jobs run {args.name}: {exc}", file=sys.stderr)
        return 2
    except (SQLAlchemyError, ConnectionError, socket.gaierror) as exc:
        print(f"kzg-gateway jobs run {args.name}: {_describe(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"kzg-gateway jobs run {args.name}: failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, default=str))
    return 0


def register(commands: Any) -> None:
    """Add ``init``, ``serve`` and ``jobs run`` to the top-level CLI."""
    init = commands.add_parser("init", help="set up the data directory (idempotent)")
    common_options(init)
    init.add_argument("--json", action="store_true", help="print the result as one JSON object")
    init.set_defaults(func=run_init)

    serve_cmd = commands.add_parser("serve", help="run the HTTPS gateway")
    common_options(serve_cmd)
    serve_cmd.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port (default 8443)")
    serve_cmd.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="json",
        help="json (one object per line, the default) or text for humans",
    )
    serve_cmd.set_defaults(func=run_serve)

    jobs = commands.add_parser("jobs", help="run a scheduled job by hand")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    run = job_commands.add_parser("run", help="run one job now")
    common_options(run)
    run.add_argument("name", help=", ".join(JOB_NAMES))
    run.set_defaults(func=run_jobs)
