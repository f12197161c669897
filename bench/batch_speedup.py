"""The batch route's parallel speed-up: N commitments as one ``POST /v1/kzg/batch`` to a
gateway with W workers, against the same N as sequential ``blob-to-commitment`` requests
(one client, one connection, over HTTPS with an API key, on the embedded SQLite).

    .venv/bin/python bench/batch_speedup.py [--engine blspy|ckzg] [--workers 2] [--count 4]
        [--rounds 5]

Prints the median wall time of each way over alternating rounds and their ratio,
sequential / batch: W at best (the W workers busy at once), 1 if the batch ran serially.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import REPO, free_port


def make_blob(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(b"\x00" + rng.randbytes(31) for _ in range(4096))


def cli(env: dict[str, str], data_dir: Path, *command: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--data-dir", str(data_dir)],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready")


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {answer}")
        return answer


async def measure(args: argparse.Namespace, base: str, ca: Path, api_key: str) -> int:
    blobs = ["0x" + make_blob(n).hex() for n in range(args.count)]
    batch = {"operations": [{"operation": "blob_to_kzg_commitment", "blob": b} for b in blobs]}
    context = ssl.create_default_context(cafile=str(ca))
    connector = aiohttp.TCPConnector(ssl=context, limit=1)
    headers = {"X-API-Key": api_key}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        await wait_ready(session, f"{base}/readyz")

        async def sequential() -> list[str]:
            return [
                (await post(session, f"{base}/v1/kzg/blob-to-commitment", {"blob": b}))[
                    "commitment"
                ]
                for b in blobs
            ]

        async def batched() -> list[str]:
            answer = await post(session, f"{base}/v1/kzg/batch", batch)
            return [result["commitment"] for result in answer["results"]]

        # Warm-up (connection, TLS session, first calls), and the same answers both ways.
        if await sequential() != await batched():
            print("the batch and the single calls answered different commitments")
            return 1
        times: dict[str, list[float]] = {"sequential": [], "batch": []}
        for _ in range(args.rounds):
            for name, run in (("sequential", sequential), ("batch", batched)):
                started = time.perf_counter()
                await run()
                times[name].append(time.perf_counter() - started)
    seq, bat = (statistics.median(times[n]) for n in ("sequential", "batch"))
    print(
        f"engine {args.engine}, {args.workers} workers, {os.cpu_count()} cores "
        f"(load average {os.getloadavg()[0]:.1f}), {args.count} commitments, "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"  {args.count} sequential requests  {seq * 1000:8.1f} ms")
    print(f"  one batch of {args.count}          {bat * 1000:8.1f} ms")
    print(f"  speed-up (sequential / batch)  {seq / bat:5.2f}x  (ideal {args.workers}x)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", default="blspy", choices=("blspy", "ckzg"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "gw"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")}
        env.update({
            "KZG_GATEWAY_ENGINE__NAME": args.engine,
            "KZG_GATEWAY_POOL__WORKERS": str(args.workers),
            "KZG_GATEWAY_JOBS__ENABLED": "false",
        })  # fmt: skip
        cli(env, data_dir, "init")
        created = json.loads(
            cli(env, data_dir, "admin", "api-keys", "create", "--name", "bench", "--role", "client")
        )
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--data-dir", str(data_dir),
             "--port", str(port)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            base = f"https://127.0.0.1:{port}"
            ca = data_dir / "tls" / "ca.pem"
            return asyncio.run(measure(args, base, ca, created["api_key"]))
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
