"""The asyncio client under concurrency, the sync client shared between threads, and the
SDK's footprint: importing it loads nothing of the server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.client import CommitmentResult, Result, VerifyResult
from kzg import Engine
from tests.client.conftest import LiveGateway, make_blob

INFINITY = bytes([0xC0]) + bytes(47)
IDENTITY = (INFINITY, bytes(32), bytes(32), INFINITY)


async def test_32_concurrent_calls_each_get_their_own_verified_receipt(
    gateway: LiveGateway, ckzg_engine: Engine
) -> None:
    """Given one async client, when 32 calls run at once, then each result is its own
    request's (distinct ids and log entries), its receipt verified, and every checkpoint
    seen lies on one history (the client ends at the largest)."""
    blobs = [make_blob(200 + i) for i in range(8)]
    async with gateway.async_client() as client:
        calls = [
            client.blob_to_kzg_commitment(blobs[i % 8])
            if i % 4 == 0
            else client.verify_kzg_proof(*IDENTITY)
            for i in range(32)
        ]
        results: list[Result] = await asyncio.gather(*calls)
        latest = client.latest_checkpoint

    assert len({r.request_id for r in results}) == 32
    seqs = {r.verified.seq for r in results if r.verified}
    assert len(seqs) == 32
    for i, result in enumerate(results):
        assert result.verified is not None and result.verified.request_id == result.request_id
        if isinstance(result, CommitmentResult):
            assert result.commitment == ckzg_engine.blob_to_kzg_commitment(blobs[i % 8])
        else:
            assert isinstance(result, VerifyResult) and result.valid
    assert latest is not None
    largest = max(r.verified.checkpoint.size for r in results if r.verified)
    assert int(latest.split("\n")[1]) >= largest


def test_one_sync_client_shared_by_threads(gateway: LiveGateway) -> None:
    client = gateway.client()
    with ThreadPoolExecutor(8) as threads:
        results = list(threads.map(lambda _: client.verify_kzg_proof(*IDENTITY), range(16)))
    assert all(r.valid and r.verified for r in results)
    assert len({r.request_id for r in results}) == 16


def test_the_client_closes_and_then_refuses(gateway: LiveGateway) -> None:
    with gateway.client() as client:
        assert client.verify_kzg_proof(*IDENTITY).valid
    client.close()  # closing twice is harmless
    try:
        client.verify_kzg_proof(*IDENTITY)
    except RuntimeError as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("a closed client answered")


def test_importing_the_sdk_loads_nothing_of_the_server() -> None:
    """The SDK needs no database, no aiohttp server and no KZG engine."""
    probe = (
        "import sys, gateway.client\n"
        "server = ('aiohttp.web', 'sqlalchemy', 'gateway.app', 'gateway.security', 'auth',"
        " 'kzg', 'blspy', 'ckzg', 'alembic', 'asyncpg', 'argon2', 'prometheus_client')\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(server))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.stdout.strip() == ""
