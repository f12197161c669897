"""``kzg-gateway admin ...``: users, API keys, signing keys and the master key, working
directly on the gateway's database (the server may be running or not).

Every command writes an audit record (actor ``cli:<os user>``) before it reports success;
secrets it creates are printed once, as JSON, and never recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.errors import AuditUnavailable
from audit.events import AuditEvent
from audit.writer import AuditWriter, begin_write
from auth.core import Committer
from auth.crypto import MASTER_KEY_ENV, MASTER_KEY_FILE, MasterKey, MasterKeyError, load_master_key
from auth.errors import NotFound
from auth.hashing import HashingBusy
from auth.master_key import rewrap_columns
from auth.policy import PolicyError
from auth.service import AuthError, AuthService, replace_master_key
from gateway.cli import cli_event, common_options
from gateway.config import Config, cli_actor, load_config
from gateway.db import check_schema, make_engine
from gateway.identity import policies_for
from gateway.receipts import SEALED_SECRETS, load_log_signer, rotate_log_key

log = logging.getLogger(__name__)
T = TypeVar("T")
Command = Callable[[AuthService, argparse.Namespace], Awaitable[dict[str, Any]]]


def _add(group: Any, name: str, help_text: str, command: Command) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text)
    common_options(parser)
    parser.set_defaults(func=functools.partial(run, command=command))
    return parser


async def _user_create(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return await service.invite_user(args.username, args.role, args.commit)


async def _user_roles(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    await service.set_roles(args.username, args.role, args.commit)
    return {"username": args.username, "roles": args.role}


async def _user_reset(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return await service.reset_user(args.username, args.commit)


async def _user_set_disabled(
    service: AuthService, args: argparse.Namespace, disabled: bool
) -> dict[str, Any]:
    await (service.disable_user if disabled else service.enable_user)(args.username, args.commit)
    return {"username": args.username, "disabled": disabled}


async def _key_create(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return await service.create_api_key(
        args.name,
        args.role,
        cli_actor(),
        args.expires_in_days,
        args.allow_cidr or None,
        args.commit,
    )


async def _key_list(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return {"api_keys": await service.list_api_keys()}


async def _key_revoke(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    await service.revoke_api_key(args.key_id, args.commit)
    return {"id": args.key_id, "revoked": True}


async def _key_rotate(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return await service.rotate_api_key(args.key_id, cli_actor(), args.commit)


async def _signing_rotate(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    signer = args.log_signer
    info = await rotate_log_key(service.engine, args.master_key, signer.origin, commit=args.commit)
    await signer.refresh()
    return info.to_dict()


async def _jwt_rotate(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return {"kid": await service.rotate_jwt_key(args.commit)}


async def _jwt_revoke(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return await service.revoke_jwt_key(args.kid, args.commit)


async def _access_review(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    return await service.access_review()


async def rewrap_secrets(
    engine: AsyncEngine, old: MasterKey, new: MasterKey, commit: Committer | None = None
) -> int:
    """Re-seal every secret of the database (identity, log and receipt keys) under ``new`` and
    record ``new`` as the master key, in one transaction (with its audit record, given
    ``commit``); returns how many. Processes still holding ``old`` can then seal nothing
    more (auth.master_key.claim_master_key)."""

    async def change(conn: AsyncConnection) -> int:
        await replace_master_key(conn, old, new)
        return await rewrap_columns(conn, old, new, SEALED_SECRETS)

    if commit is not None:
        return await commit(change, {})
    async with engine.connect() as conn:
        await begin_write(conn)
        count = await change(conn)
        await conn.commit()
    return count


def keep_retired_key(path: Path, now: datetime) -> Path:
    """Copy the master key file about to be replaced to ``master.key.<UTC time>.retired``
    (0600): backups sealed under it still need it, or a re-seal."""
    retired = path.with_name(f"{path.name}.{now:%Y%m%dT%H%M%SZ}.retired")
    fd = os.open(retired, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(path.read_text())
    return retired


async def _master_rotate(service: AuthService, args: argparse.Namespace) -> dict[str, Any]:
    """New master key: written beside the old file first, secrets re-sealed in one
    transaction, then the file swapped in. With the key in the environment, the new key
    is printed once for the operator to store."""
    new_raw = MasterKey.generate()
    new = MasterKey(new_raw)
    from_env = bool(os.environ.get(MASTER_KEY_ENV))
    path = args.data_dir_resolved / MASTER_KEY_FILE
    staged = path.with_suffix(".new")
    if not from_env:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(new_raw.hex() + "\n")
    count = await rewrap_secrets(service.engine, args.master_key, new, args.commit)
    result: dict[str, Any] = {"rewrapped": count}
    if from_env:
        result["new_master_key"] = new_raw.hex()
        result["note"] = f"set {MASTER_KEY_ENV} to new_master_key on every instance now"
    else:
        result["retired_master_key_file"] = str(keep_retired_key(path, datetime.now(UTC)))
        os.replace(staged, path)
        result["master_key_file"] = str(path)
    result["next"] = (
        "restart every instance with the new key, one at a time: until then old-key "
        "instances answer 503 only to what needs a secret"
    )
    return result


async def _execute(config: Config, args: argparse.Namespace, command: Command) -> dict[str, Any]:
    master_key = load_master_key(config.data_dir)
    args.master_key = master_key
    args.data_dir_resolved = config.data_dir
    engine = make_engine(config.database_url)
    origin = config.audit.origin
    writer: AuditWriter | None = None
    rbac, policy = policies_for(config)
    try:
        await check_schema(engine)
        try:
            args.log_signer = await load_log_signer(engine, master_key, origin)
        except Exception as exc:
            # No log key, no audit record: the refusal leaves its trace in the process log.
            log.warning("refused %s %s: %s", args.admin_command, args.admin_action, exc)
            raise
        writer = AuditWriter(
            engine, args.log_signer, commit_timeout=config.audit.commit_timeout_seconds
        )
        await writer.start()
        service = AuthService(engine, master_key, rbac, policy)
        action = f"cli:admin_{args.admin_command}_{args.admin_action}".replace("-", "_")
        outcome, detail = "success", {}
        recorded = False

        def event(outcome: str, detail: dict[str, Any]) -> AuditEvent:
            return cli_event(action, outcome, {**detail, **_audit_detail(args)})

        async def commit(
            change: Callable[[AsyncConnection], Awaitable[T]], changed: Mapping[str, Any]
        ) -> T:
            # The change commits with its success record, or neither does.
            nonlocal recorded
            _, result = await writer.commit_change(event("success", dict(changed)), change)
            recorded = True
            return result

        args.commit = commit
        try:
            result = await command(service, args)
        except (AuthError, PolicyError, NotFound) as exc:
            outcome, detail = "invalid", {"error": str(exc)}
            raise
        except BaseException as exc:
            # Anything else failed too (master key, database, disk): never "success". The
            # class only: a driver's message may quote statement parameters.
            outcome, detail = "error", {"error": type(exc).__name__}
            raise
        finally:
            if not recorded:
                await writer.append(event(outcome, detail))
        return result
    finally:
        if writer is not None:
            await writer.stop()
        await engine.dispose()


def _audit_detail(args: argparse.Namespace) -> dict[str, Any]:
    """The non-secret arguments of the command."""
    keep = ("username", "role", "name", "key_id", "kid", "expires_in_days", "allow_cidr")
    return {k: getattr(args, k) for k in keep if getattr(args, k, None) is not None}


def run(args: argparse.Namespace, command: Command) -> int:
    try:
        config = load_config(args.config, args.data_dir)
        result = asyncio.run(_execute(config, args, command))
    except (AuthError, PolicyError, NotFound) as exc:
        print(f"kzg-gateway admin: {exc}", file=sys.stderr)
        return 1
    except (SQLAlchemyError, MasterKeyError, OSError, AuditUnavailable, HashingBusy) as exc:
        print(f"kzg-gateway admin: cannot reach the gateway's data: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``admin`` command group to the top-level CLI."""
    admin = subparsers.add_parser("admin", help="manage users, API keys and keys")
    groups = admin.add_subparsers(dest="admin_command", required=True)

    user_cmds = groups.add_parser("users", help="people").add_subparsers(
        dest="admin_action", required=True
    )
    create = _add(
        user_cmds,
        "create",
        "create a person who enrols themselves (enrolment token shown once)",
        _user_create,
    )
    create.add_argument("username")
    create.add_argument("--role", action="append", required=True, help="repeatable")
    roles = _add(user_cmds, "set-roles", "replace a person's roles", _user_roles)
    roles.add_argument("username")
    roles.add_argument("--role", action="append", required=True, help="repeatable")
    _add(
        user_cmds,
        "reset",
        "revoke password and TOTP; new enrolment token (shown once)",
        _user_reset,
    ).add_argument("username")
    for action, help_text, disabled in (
        ("disable", "disable a person", True),
        ("enable", "enable a disabled person again", False),
    ):
        command = functools.partial(_user_set_disabled, disabled=disabled)
        _add(user_cmds, action, help_text, command).add_argument("username")

    key_cmds = groups.add_parser("api-keys", help="machine identities").add_subparsers(
        dest="admin_action", required=True
    )
    key_create = _add(key_cmds, "create", "create an API key (shown once)", _key_create)
    key_create.add_argument("--name", required=True)
    key_create.add_argument("--role", required=True)
    key_create.add_argument("--expires-in-days", type=int)
    key_create.add_argument("--allow-cidr", action="append", help="repeatable")
    _add(key_cmds, "list", "list API keys (never their secrets)", _key_list)
    _add(key_cmds, "revoke", "revoke an API key", _key_revoke).add_argument("key_id")
    _add(key_cmds, "rotate", "replace an API key (new one shown once)", _key_rotate).add_argument(
        "key_id"
    )

    rotating: dict[str, Any] = {}
    for group, help_text, command in (
        ("signing-keys", "log signing keys (they sign every checkpoint)", _signing_rotate),
        ("jwt-keys", "JWT signing keys", _jwt_rotate),
        ("master-key", "master key that seals every secret", _master_rotate),
    ):
        sub = groups.add_parser(group, help=help_text).add_subparsers(
            dest="admin_action", required=True
        )
        _add(sub, "rotate", f"rotate the {help_text}", command)
        rotating[group] = sub
    _add(
        rotating["jwt-keys"],
        "revoke",
        "revoke a JWT key: its tokens are refused at once",
        _jwt_revoke,
    ).add_argument("kid")
    review = groups.add_parser("access-review", help="who can do what").add_subparsers(
        dest="admin_action", required=True
    )
    _add(review, "show", "every principal, roles, last use, flags", _access_review)
