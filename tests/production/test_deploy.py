"""Deploying as documented, on a real PostgreSQL with real processes: the set-up sequence
of docs/operations.md run as written from a fresh data directory, the auditor role that
reads and exports but cannot write, and the previous release's code serving on the
schema this release migrated (rollback, old pods restarting mid-rollout)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from auth.crypto import MasterKey
from gateway.db import alembic_config, make_engine, migrate
from tests.audit import helpers as audit_helpers
from tests.conftest import OS_ACTOR, REPO, PgDatabase, free_port, missing
from tests.gateway.helpers import IDENTITY_PROOF, ORIGIN, check_receipt, input_digests, vkeys_of
from tests.production.test_instances import CHEAP_ARGON2, Instance, get

# The release before this one: its code must keep serving on this release's schema.
PREVIOUS_RELEASE = "ce735d3"
AUDIT_TABLES = (*audit_helpers.AUDIT_TABLES, "audit_retention")


def _plain(url: str) -> str:
    """The URL as the docs write it (the gateway picks the async driver itself)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def documented_sequence() -> list[str]:
    """The commands of the ``production-sequence`` block of docs/operations.md, one per
    entry, continuation lines joined."""
    doc = (REPO / "docs" / "operations.md").read_text()
    match = re.search(r"<!-- production-sequence -->\s*```sh\n(.*?)```", doc, re.DOTALL)
    assert match, "docs/operations.md lost its production sequence"
    joined = match.group(1).replace("\\\n", " ")
    return [
        line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def _fill(words: list[str], values: dict[str, str], urls: dict[str, str]) -> list[str]:
    """Replace the docs' placeholders (…, db/kzg, role names) with this test's values."""
    filled = []
    for word in words:
        name, sep, _ = word.partition("=")
        if sep and name in values:
            word = f"{name}={values[name]}"
        for role, url in urls.items():
            word = word.replace(f"postgresql://{role}:…@db/kzg", url)
        assert "…" not in word, f"a placeholder the test does not fill: {word}"
        filled.append(word)
    return filled


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result


async def _kzg_request(instance: Instance, key: str) -> tuple[str, dict[str, Any]]:
    """One verify-proof request that must succeed: its request id and answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{instance.url}/v1/kzg/verify-proof",
            json=IDENTITY_PROOF,
            headers={"X-API-Key": key},
            ssl=instance.ssl(),
        ) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
        return response.headers["X-Request-ID"], answer


async def test_documented_postgresql_sequence_runs_from_a_fresh_data_dir(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    data_dir = tmp_path / "fresh"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")},
        # Only what a test machine needs beside the docs: a free port, a cheap engine.
        "KZG_GATEWAY_SERVER__PORT": str(port),
        "KZG_GATEWAY_ENGINE__NAME": "ckzg",
        "KZG_GATEWAY_POOL__WORKERS": "1",
        "KZG_GATEWAY_AUTH__PASSWORDS": CHEAP_ARGON2,
    }
    values = {
        "KZG_GATEWAY_DATA_DIR": str(data_dir),
        "KZG_GATEWAY_MASTER_KEY": MasterKey.generate().hex(),
        "KZG_GATEWAY_DATABASE_APP_ROLE": pg_database.app_role,
        "KZG_GATEWAY_DATABASE_AUDITOR_ROLE": pg_database.auditor_role,
    }
    urls = {
        "kzg_owner": _plain(pg_database.owner_url),
        "kzg_app": _plain(pg_database.app_url),
        "kzg_auditor": _plain(pg_database.auditor_url),
    }
    server = Instance("documented", data_dir, port, env, log_file=tmp_path / "serve.log")
    api_key = ""
    served_size = 0
    commands = documented_sequence()
    assert any(c.split()[-1] == "serve" for c in commands)
    try:
        for command in commands:
            words = _fill(shlex.split(command, comments=True), values, urls)
            if words[0] == "export":
                name, _, value = words[1].partition("=")
                env[name] = value
                continue
            assignments = [w for w in words if "=" in w and w.split("=")[0].isupper()]
            argv = words[len(assignments) :]
            assert argv[0] == "kzg-gateway", command
            call_env = {**env, **dict(a.split("=", 1) for a in assignments)}
            argv = [sys.executable, "-m", "gateway", *argv[1:]]
            if argv[-1] == "serve":
                server.env = call_env
                with server.log_path.open("ab") as log:
                    server.process = subprocess.Popen(
                        argv, env=call_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
                    )
                await server.wait_ready()
                served_size = await _while_serving(server, api_key)
                continue
            result = _run(argv, call_env, tmp_path)
            if argv[3:6] == ["admin", "api-keys", "create"]:
                api_key = json.loads(result.stdout)["api_key"]
    finally:
        server.stop()
    # Nothing went to an embedded SQLite file beside the PostgreSQL deployment.
    assert not (data_dir / "gateway.db").exists()
    # The auditor's export holds every act, each with its actor.
    entries = [
        json.loads(json.loads(line)["entry"])
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "event"
    ]
    acts = [(e["action"], e["actor"]) for e in entries]
    assert acts[:4] == [
        ("cli:init_schema", OS_ACTOR),
        ("cli:init_log_key", OS_ACTOR),
        ("cli:init_jwt_key", OS_ACTOR),
        ("cli:init_first_admin", OS_ACTOR),
    ]
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert entries[0]["detail"] == {"from": [], "to": sorted(heads)}
    assert entries[3]["detail"] == {"username": "admin", "roles": ["admin"]}
    assert ("cli:admin_api_keys_create", OS_ACTOR) in acts
    # By hand: the operator; at the server's start: the scheduler's own checkpoint,
    # signed before the first answer (the first checkpoint served already covers it).
    assert acts[5:7] == [("job:checkpoint", OS_ACTOR), ("job:checkpoint", "system:jobs")]
    assert served_size >= 7


async def _while_serving(server: Instance, api_key: str) -> int:
    """The server answers a KZG request with a receipt the published keys verify.
    Returns the size of the checkpoint it served before that request."""
    async with aiohttp.ClientSession() as session:
        vkeys = vkeys_of((await get(server, "/v1/log/keys", session))[1])
        status, note = await get(server, "/v1/log/checkpoint", session, api_key)
        assert status == 200, note
    request_id, answer = await _kzg_request(server, api_key)
    check_receipt(answer, request_id, vkeys, input_digests(IDENTITY_PROOF))
    return int(note.splitlines()[1])


async def test_auditor_role_reads_and_exports_but_cannot_write(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    env = {
        **os.environ,
        "KZG_GATEWAY_MASTER_KEY": MasterKey.generate().hex(),
        "KZG_GATEWAY_DATABASE_OWNER_URL": pg_database.owner_url,
        "KZG_GATEWAY_DATABASE_APP_ROLE": pg_database.app_role,
        "KZG_GATEWAY_DATABASE_AUDITOR_ROLE": pg_database.auditor_role,
        "KZG_GATEWAY_AUTH__PASSWORDS": CHEAP_ARGON2,
    }
    cli = [sys.executable, "-m", "gateway"]
    _run([*cli, "init", "--data-dir", str(tmp_path / "d")], env, REPO)
    # Read and export with the auditor's URL: the export verifies.
    export = tmp_path / "audit.jsonl"
    auditor = _plain(pg_database.auditor_url)
    _run([*cli, "audit", "export", "--db-url", auditor, "--output", str(export)], env, REPO)
    _run([*cli, "audit", "verify", "--db-url", auditor], env, REPO)
    verified = _run([*cli, "audit", "verify", "--export", str(export)], env, REPO)
    assert "valid" in verified.stdout and len(export.read_text().splitlines()) > 4

    engine = make_engine(pg_database.auditor_url)
    refused = [
        *(f"INSERT INTO {t} SELECT * FROM {t} LIMIT 1" for t in AUDIT_TABLES),
        *(f"DELETE FROM {t}" for t in AUDIT_TABLES),
        "UPDATE audit_log_head SET size = 0",
        "UPDATE audit_retention SET keep_years = 1",
        "SELECT count(*) FROM users",
        "SELECT count(*) FROM api_keys",
        "SELECT sealed_private_key FROM log_keys",
        "SELECT sealed_private_key FROM receipt_keys",
        "INSERT INTO users (username) VALUES ('mallory')",
    ]
    try:
        async with engine.connect() as conn:
            for table in AUDIT_TABLES:
                await conn.execute(text(f"SELECT count(*) FROM {table}"))
            keys = (await conn.execute(text("SELECT key_id, vkey FROM log_keys"))).all()
            assert len(keys) == 1 and keys[0].vkey.startswith(ORIGIN)
            await conn.rollback()
            for statement in refused:
                with pytest.raises(DBAPIError, match="permission denied"):
                    await conn.execute(text(statement))
                await conn.rollback()
            # Nor may it call a function that writes (PostgreSQL lets PUBLIC execute
            # functions unless revoked).
            writers = (
                await conn.execute(
                    text(
                        "SELECT p.oid::regprocedure::text FROM pg_proc p "
                        "JOIN pg_namespace n ON n.oid = p.pronamespace "
                        "WHERE n.nspname = current_schema() AND p.prosecdef "
                        "AND has_function_privilege(current_user, p.oid, 'EXECUTE')"
                    )
                )
            ).all()
            assert writers == []
    finally:
        await engine.dispose()


def _previous_release(into: Path) -> Path:
    """The previous release's code from the repository's history (CI clones it whole)."""
    archive = into / "previous.tar"
    result = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), PREVIOUS_RELEASE],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        missing(f"release {PREVIOUS_RELEASE} in the git history: {result.stderr.strip()}")
    code = into / "previous"
    with tarfile.open(archive) as tar:
        tar.extractall(code, filter="data")
    return code


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_previous_release_serves_on_the_new_schema(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    previous = _previous_release(tmp_path)
    env = {
        **os.environ,
        "KZG_GATEWAY_MASTER_KEY": MasterKey.generate().hex(),
        "KZG_GATEWAY_ENGINE__NAME": "ckzg",
        "KZG_GATEWAY_POOL__WORKERS": "1",
        "KZG_GATEWAY_AUTH__PASSWORDS": CHEAP_ARGON2,
    }
    data_dir = tmp_path / "new"
    source = ["--data-dir", str(data_dir)]
    if store == "postgresql":
        pg: PgDatabase = request.getfixturevalue("pg_database")
        env["KZG_GATEWAY_DATABASE_URL"] = pg.app_url
        env["KZG_GATEWAY_DATABASE_OWNER_URL"] = pg.owner_url
        env["KZG_GATEWAY_DATABASE_APP_ROLE"] = pg.app_role
        source = ["--db-url", pg.owner_url]
    # This release migrates the database (as the migration Job does) and serves.
    new = Instance("new", data_dir, free_port(), env)
    new.cli("init", "--json")
    key = new.cli("admin", "api-keys", "create", "--name", "ci", "--role", "client")["api_key"]
    # The previous release's code, alone on its import path, shares the data (TLS files,
    # database, master key): an old pod restarting mid-rollout, or the image rolled back.
    old_env = {**env, "PYTHONPATH": str(previous)}
    old = Instance("old", new.data_dir, free_port(), old_env, log_file=tmp_path / "old.log")
    try:
        new.start()
        with old.log_path.open("ab") as log:
            old.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--data-dir", str(old.data_dir),
                 "--port", str(old.port)],
                env=old_env,
                cwd=previous,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        await asyncio.gather(new.wait_ready(), old.wait_ready())
        async with aiohttp.ClientSession() as session:
            vkeys = vkeys_of((await get(new, "/v1/log/keys", session))[1])
        for instance in (old, new):
            request_id, answer = await _kzg_request(instance, key)
            assert answer["valid"] is True, answer
            check_receipt(answer, request_id, vkeys, input_digests(IDENTITY_PROOF))
    finally:
        old.stop()
        new.stop()
    # Both releases wrote one log that this release verifies.
    cli = [sys.executable, "-m", "gateway", "audit"]
    verified = _run([*cli, "verify", *source], env, REPO)
    assert "audit log valid" in verified.stdout
    # The old server was the previous release's code: only this release signs a
    # checkpoint (a job:checkpoint record) at start.
    export = tmp_path / "audit.jsonl"
    _run([*cli, "export", *source, "--output", str(export)], env, REPO)
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    entries = [json.loads(line["entry"]) for line in lines if line["type"] == "event"]
    starts = [e for e in entries if (e["action"], e["actor"]) == ("job:checkpoint", "system:jobs")]
    assert len(starts) == 1
    assert sum(e["action"] == "verify_kzg_proof" for e in entries) == 2, entries


async def test_a_schema_migrated_by_the_previous_release_upgrades_in_place(
    pg_database: PgDatabase,
) -> None:
    """The upgrade path itself: the previous release's heads, then this release's."""
    for head in ("audit_0003", "auth_0003", "gateway_0003"):
        await migrate(pg_database.owner_url, pg_database.app_role, target=head)
    await migrate(pg_database.owner_url, pg_database.app_role)
    engine = make_engine(pg_database.app_url)
    try:
        async with engine.connect() as conn:
            heads = {
                r[0] for r in await conn.execute(text("SELECT version_num FROM alembic_version"))
            }
            recorded = dict(
                (
                    await conn.execute(
                        text("SELECT revision, backward_compatible FROM schema_revisions")
                    )
                ).all()
            )
    finally:
        await engine.dispose()
    # The previous release requires its own heads in alembic_version: they are all there.
    assert {"audit_0003", "auth_0003", "gateway_0003"} <= heads
    assert heads == set(ScriptDirectory.from_config(alembic_config()).get_heads())
    assert recorded["gateway_0004"] is True and recorded["gateway_0003"] is False
