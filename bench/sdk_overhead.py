"""Per-call overhead of the Python SDK (``gateway.client``) over raw HTTP.

    .venv/bin/python bench/sdk_overhead.py [--calls 200] [--rounds 5] [--engine ckzg]

Starts a gateway (``init`` + ``serve`` in a scratch data directory), then makes the same
sequential ``verify_kzg_proof`` calls (one client, kept-alive connection):

- raw aiohttp: POST the JSON body with the API key, read and parse the answer (what a
  hand-written client does, verifying nothing);
- raw http.client: the same, synchronously;
- the async SDK, and the sync SDK: every receipt verified against the pinned log key and
  bound to the call (request id, input digests, result digest), with and without the
  consistency check (one extra ``GET /v1/log/proof/consistency`` per new checkpoint).

Rounds alternate the variants so that load from elsewhere on the machine hits all alike;
the median round of each is reported, as mean milliseconds per call and as the ratio to
its raw baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import free_port, machine_facts  # noqa: E402

from gateway.client import AsyncGatewayClient, GatewayClient  # noqa: E402

INFINITY = bytes([0xC0]) + bytes(47)
# The zero polynomial's proof at z = 0: a valid proof that needs no engine to build.
ARGS = (INFINITY, bytes(32), bytes(32), INFINITY)
BODY = json.dumps(
    {"commitment": "0x" + INFINITY.hex(), "z": "0x" + "00" * 32, "y": "0x" + "00" * 32,
     "proof": "0x" + INFINITY.hex()}
).encode()  # fmt: skip
PATH = "/v1/kzg/verify-proof"


def _gateway(env: dict[str, str], data_dir: Path, *command: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--data-dir", str(data_dir)],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def _wait_ready(port: int, ca: Path, timeout: float = 120) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the gateway did not become ready")


async def raw_aiohttp(url: str, key: str, ca: Path, calls: int) -> float:
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca)))
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        for _ in range(calls):
            async with session.post(url + PATH, data=BODY, headers=headers) as response:
                answer = json.loads(await response.read())
                assert response.status == 200 and answer["valid"] is True
        return time.perf_counter() - started


def raw_http_client(port: int, key: str, ca: Path, calls: int) -> float:
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    started = time.perf_counter()
    for _ in range(calls):
        connection.request("POST", PATH, body=BODY, headers=headers)
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and answer["valid"] is True
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


async def sdk_async(options: dict[str, Any], calls: int) -> float:
    async with AsyncGatewayClient(**options) as client:
        await client.verify_kzg_proof(*ARGS)  # connect and see a first checkpoint
        started = time.perf_counter()
        for _ in range(calls):
            assert (await client.verify_kzg_proof(*ARGS)).valid
        return time.perf_counter() - started


def sdk_sync(options: dict[str, Any], calls: int) -> float:
    with GatewayClient(**options) as client:
        client.verify_kzg_proof(*ARGS)
        started = time.perf_counter()
        for _ in range(calls):
            assert client.verify_kzg_proof(*ARGS).valid
        return time.perf_counter() - started


def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="sdk-bench-"))
    env = {
        **os.environ,
        "KZG_GATEWAY_ENGINE__NAME": args.engine,
        "KZG_GATEWAY_JOBS__ENABLED": "false",
    }
    _gateway(env, data_dir, "init")
    key = json.loads(
        _gateway(
            env, data_dir, "admin", "api-keys", "create", "--name", "bench", "--role", "client"
        )
    )["api_key"]
    ca = data_dir / "tls" / "ca.pem"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ready(port, ca)
        url = f"https://127.0.0.1:{port}"
        with GatewayClient(base_url=url, api_key=key, ca_file=ca, verify_receipts=False) as c:
            vkeys = c.published_log_keys()
        options = {"base_url": url, "api_key": key, "ca_file": ca, "log_keys": vkeys}
        no_consistency = {**options, "check_consistency": False}
        variants: dict[str, Callable[[], float]] = {
            "raw aiohttp": lambda: asyncio.run(raw_aiohttp(url, key, ca, args.calls)),
            "raw http.client": lambda: raw_http_client(port, key, ca, args.calls),
            "SDK async": lambda: asyncio.run(sdk_async(options, args.calls)),
            "SDK async, no consistency": lambda: asyncio.run(sdk_async(no_consistency, args.calls)),
            "SDK sync": lambda: sdk_sync(options, args.calls),
            "SDK sync, no consistency": lambda: sdk_sync(no_consistency, args.calls),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, measure in variants.items():
                times[name].append(measure() / args.calls * 1000)
        per_call = {name: statistics.median(values) for name, values in times.items()}
        for line in machine_facts():
            print(line)
        print(
            f"verify_kzg_proof, {args.calls} sequential calls x {args.rounds} rounds, engine "
            f"{args.engine}, {os.cpu_count()} cores (median round, ms per call)"
        )
        baselines = {"SDK async": "raw aiohttp", "SDK sync": "raw http.client"}
        for name, ms in per_call.items():
            base = next((b for prefix, b in baselines.items() if name.startswith(prefix)), None)
            extra = ""
            if base is not None:
                extra = f"  x{ms / per_call[base]:.2f} of {base} (+{ms - per_call[base]:.2f} ms)"
            print(f"  {name:<28} {ms:7.2f} ms{extra}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", default="ckzg", choices=("blspy", "ckzg"))
    run(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
