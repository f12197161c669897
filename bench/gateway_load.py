"""Load benchmark of the gateway over HTTPS against (a) the raw engine called in-process
and (b) a bare aiohttp server running the same worker pool with no auth, audit or receipt.

    .venv/bin/python bench/gateway_load.py [--engine blspy|ckzg] [--workers 2]
        [--concurrency 16] [--seconds 5] [--database-url URL --owner-url URL --app-role R]

Prints throughput and p50/p95/p99 for verify-proof, verify-blob-proof and
blob-to-commitment, then the ratios the gateway is held to, then verify-proof with an
API key against the same gateway with auth disabled (``--auth-only`` runs just that).
``--scale-out`` (with a PostgreSQL URL) compares one and two instances on one database
and prints where a request's time goes. ``--cross-check`` prints the cost of
``[engine] cross_check``: the gateway with every result also computed by the other engine
against the same gateway without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPERATIONS = {
    "verify-proof": "verify_kzg_proof",
    "verify-blob-proof": "verify_blob_kzg_proof",
    "blob-to-commitment": "blob_to_kzg_commitment",
}


def _blob(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(b"\x00" + rng.randbytes(31) for _ in range(4096))


def make_inputs(engine: Any) -> dict[str, tuple[list[bytes], dict[str, str]]]:
    """Engine arguments and the JSON body of each measured operation."""
    blob = _blob(1)
    z = bytes(31) + b"\x07"
    commitment = engine.blob_to_kzg_commitment(blob)
    proof, y = engine.compute_kzg_proof(blob, z)
    blob_proof = engine.compute_blob_kzg_proof(blob, commitment)
    hx = lambda b: "0x" + b.hex()  # noqa: E731
    return {
        "verify-proof": (
            [commitment, z, y, proof],
            {"commitment": hx(commitment), "z": hx(z), "y": hx(y), "proof": hx(proof)},
        ),
        "verify-blob-proof": (
            [blob, commitment, blob_proof],
            {"blob": hx(blob), "commitment": hx(commitment), "proof": hx(blob_proof)},
        ),
        "blob-to-commitment": ([blob], {"blob": hx(blob)}),
    }


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "rps": len(ordered) / elapsed,
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "n": len(ordered),
    }


def raw_engine_loop(
    engine: Any, function: str, args: list[bytes], seconds: float
) -> dict[str, float]:
    """One in-process call loop: what one core does without the gateway."""
    call = getattr(engine, function)
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        call(*args)
        latencies.append(time.perf_counter() - now)
    return summary(latencies, time.perf_counter() - start)


async def drive(
    url: str,
    body: dict[str, str],
    headers: dict[str, str],
    ca: Path,
    concurrency: int,
    seconds: float,
) -> dict[str, float]:
    """``concurrency`` clients posting back to back for ``seconds``; non-200 is an error."""
    context = ssl.create_default_context(cafile=str(ca))
    payload = json.dumps(body).encode()
    sent = {**headers, "Content-Type": "application/json"}
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm every connection's TLS session first.
        await asyncio.gather(
            *(session.post(url, data=payload, headers=sent) for _ in range(concurrency))
        )
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                async with session.post(url, data=payload, headers=sent) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1
                        continue
                latencies.append(time.perf_counter() - began)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    result = summary(latencies, elapsed)
    result["errors"] = failures
    return result


def run_baseline(args: argparse.Namespace) -> None:
    """The bare aiohttp server: same TLS, same parsing and worker pool, nothing else."""
    from aiohttp import web

    from gateway.limits import SERVER_LIMITS, ServerLimits
    from gateway.pool import EnginePool, PoolSettings
    from gateway.routes import kzg as kzg_routes
    from gateway.settings import TlsSettings
    from gateway.tls import server_ssl_context

    ops = {op.path: op for op in kzg_routes.operations()}
    pool_key = web.AppKey("pool", EnginePool)

    async def handle(request: web.Request) -> web.Response:
        op = ops[request.path]
        inputs = await kzg_routes.parse_inputs(request, op)
        result = await request.app[pool_key].call(op.call, *inputs)
        return web.json_response(op.output(result))

    async def pool_ctx(app: web.Application) -> Any:
        settings = PoolSettings(
            engine=args.engine, workers=args.workers, max_queue=args.concurrency
        )
        pool = EnginePool(settings)
        await pool.start()
        app[pool_key] = pool
        yield
        await pool.stop()

    app = web.Application()
    app[SERVER_LIMITS] = ServerLimits()  # the body timeout the route parsers apply
    app.cleanup_ctx.append(pool_ctx)
    for path in ops:
        app.router.add_post(path, handle)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        ssl_context=server_ssl_context(TlsSettings(), args.data_dir),
        access_log=None,
        print=None,
    )


def _spawn(args: argparse.Namespace, *command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *command], cwd=REPO, env=args.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def serve_gateway(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    return _spawn(
        args, "-m", "gateway", "serve", "--data-dir", str(args.data_dir), "--port", str(port)
    )


def serve_baseline(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    return _spawn(
        args, __file__, "--baseline-serve", "--port", str(port), "--data-dir", str(args.data_dir),
        "--engine", args.engine, "--workers", str(args.workers),
        "--concurrency", str(args.concurrency),
    )  # fmt: skip


def _gateway(args: argparse.Namespace, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--data-dir", str(args.data_dir)],
        cwd=REPO, env=args.env, check=True, capture_output=True, text=True,
    )  # fmt: skip


async def _wait_ready(url: str, ca: Path, timeout: float = 120) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, ssl=context) as response:
                    if response.status in (200, 404):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready")


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run of median throughput."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def _row(name: str, r: dict[str, float]) -> str:
    return f"  {name:<22} {r['rps']:>9.1f}/s  p50 {r['p50']:7.2f} ms  p95 {r['p95']:7.2f} ms  p99 {r['p99']:7.2f} ms"


async def bench(args: argparse.Namespace) -> int:
    from gateway.pool import warm_engine

    print(f"engine {args.engine}, {args.workers} workers, {os.cpu_count()} cores, "
          f"{args.concurrency} clients, {args.seconds:g} s per run, database {args.database}")  # fmt: skip
    _gateway(args, "init")
    created = json.loads(
        _gateway(args, "admin", "api-keys", "create", "--name", "bench", "--role", "client").stdout
    )
    headers = {"X-API-Key": created["api_key"]}
    ca = args.data_dir / "tls" / "ca.pem"
    gw_port, base_port = args.port, args.port + 1
    servers = [serve_gateway(args, gw_port), serve_baseline(args, base_port)]
    try:
        engine = warm_engine(args.engine)
        inputs = make_inputs(engine)
        await _wait_ready(f"https://127.0.0.1:{gw_port}/readyz", ca)
        await _wait_ready(f"https://127.0.0.1:{base_port}/", ca)
        ratios: list[tuple[str, float, float, str]] = []
        for op in args.ops.split(","):
            function = OPERATIONS[op]
            engine_args, body = inputs[op]
            path = f"/v1/kzg/{op}"
            raw = raw_engine_loop(engine, function, engine_args, args.seconds)
            # Alternate short runs of the two servers so that load from elsewhere on the
            # machine hits both alike; the median run of each is reported.
            runs: dict[str, list[dict[str, float]]] = {"base": [], "gw": []}
            for _ in range(args.rounds):
                for name, port, sent in (("base", base_port, {}), ("gw", gw_port, headers)):
                    url = f"https://127.0.0.1:{port}{path}"
                    seconds = args.seconds / args.rounds
                    runs[name].append(await drive(url, body, sent, ca, args.concurrency, seconds))
            base, gw = (_median(runs[n]) for n in runs)
            print(f"{op}:")
            print(_row("raw engine (1 loop)", raw))
            print(_row("bare aiohttp + pool", base) + f"  errors {base['errors']}")
            print(_row("gateway", gw) + f"  errors {gw['errors']}")
            ratios.append((f"{op}: gateway / bare throughput", gw["rps"] / base["rps"], 0.8, ">="))
            if op == "verify-blob-proof":
                ratios.append((f"{op}: gateway / one raw loop", gw["rps"] / raw["rps"], 1.7, ">="))
            if op == "verify-proof":
                serial = await drive(
                    f"https://127.0.0.1:{gw_port}{path}", body, headers, ca, 1, args.seconds
                )
                print(_row("gateway, 1 client", serial))
                added = serial["p50"] - raw["p50"]
                ratios.append((f"{op}: p50 added latency (ms)", added, 3.0, "<="))
        print("targets:")
        failed = 0
        for label, value, target, sense in ratios:
            ok = value >= target if sense == ">=" else value <= target
            failed += not ok
            print(
                f"  {label:<44} {value:7.2f}  (target {sense} {target:g})  {'ok' if ok else 'MISSED'}"
            )
        return 1 if failed else 0
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", default="blspy", choices=("blspy", "ckzg"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--ops", default=",".join(OPERATIONS), help="comma-separated subset of the operations"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per server")
    parser.add_argument("--port", type=int, default=18643)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--database-url", help="PostgreSQL runtime URL (default: embedded SQLite)")
    parser.add_argument("--owner-url", help="PostgreSQL migration owner URL")
    parser.add_argument("--app-role", help="PostgreSQL runtime role")
    parser.add_argument("--baseline-serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--auth-off-serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--auth-only", action="store_true", help="only the API key vs auth disabled comparison"
    )
    parser.add_argument(
        "--cross-check",
        action="store_true",
        help="only the cost of [engine] cross_check (every result computed by both engines)",
    )
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="one vs two instances on PostgreSQL (needs --database-url) and where time goes",
    )
    args = parser.parse_args()
    if args.baseline_serve:
        run_baseline(args)
        return 0
    if args.auth_off_serve:
        run_auth_off(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = args.data_dir or Path(tmp) / "gw"
        args.database = "postgresql" if args.database_url else "sqlite"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")}
        env.update({
            "KZG_GATEWAY_ENGINE__NAME": args.engine,
            "KZG_GATEWAY_POOL__WORKERS": str(args.workers),
            # Room for every client in the queue: throughput, not shedding, is measured.
            "KZG_GATEWAY_POOL__MAX_QUEUE": str(args.concurrency),
            "KZG_GATEWAY_JOBS__ENABLED": "false",
            # The client role's rate limit would answer 429 to the load: lifted, so that the
            # middleware runs but never refuses, and every answer counted is a result.
            "KZG_GATEWAY_AUTH__RATELIMIT__CLIENT__RATE": "1000000",
            "KZG_GATEWAY_AUTH__RATELIMIT__CLIENT__BURST": "1000000",
            # Likewise the one key's share of the engine: every client's call in flight.
            "KZG_GATEWAY_AUTH__ENGINE_SHARE__CLIENT__MAX_IN_FLIGHT": str(max(args.concurrency, 16)),
        })  # fmt: skip
        if args.database_url:
            env.update({
                "KZG_GATEWAY_DATABASE_URL": args.database_url,
                "KZG_GATEWAY_DATABASE_OWNER_URL": args.owner_url or args.database_url,
                "KZG_GATEWAY_DATABASE_APP_ROLE": args.app_role or "",
            })  # fmt: skip
        args.env = env
        if args.scale_out:
            return asyncio.run(scale_out(args))
        if args.cross_check:
            return asyncio.run(cross_check_cost(args))
        status = 0 if args.auth_only else asyncio.run(bench(args))
        return asyncio.run(auth_overhead(args)) or status


def run_auth_off(args: argparse.Namespace) -> None:
    """The gateway itself with authentication, authorization and rate limiting replaced by
    one fixed client principal: the "auth disabled" side of the API-key comparison."""
    from aiohttp import web

    from auth.principal import Principal
    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.context import REQUEST_CONTEXT
    from gateway.server import start_server
    from gateway.tls import server_ssl_context

    caller = Principal("bench", "api_key", "bench", ("client",))

    @web.middleware
    async def no_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        request[REQUEST_CONTEXT].principal = caller
        return await handler(request)

    config = load_config(None, args.data_dir)

    async def serve() -> None:
        # The gateway's own listener, so that only authentication differs.
        app = create_app(config, security=lambda app, config: [no_auth])
        ssl_context = server_ssl_context(config.tls, args.data_dir)
        await start_server(app, "127.0.0.1", args.port, ssl_context)
        await asyncio.Event().wait()  # until terminated

    asyncio.run(serve())


async def auth_overhead(args: argparse.Namespace) -> int:
    """verify-proof (the cheapest route, where auth weighs most) through the gateway with
    an API key, against the same gateway with auth disabled, in alternating runs; prints
    the medians and their ratio (target >= 0.95). The client's rate limit is lifted on both
    sides so that the middleware runs but never refuses."""
    from gateway.pool import warm_engine

    _gateway(args, "init")
    created = json.loads(
        _gateway(args, "admin", "api-keys", "create", "--name", "auth-bench", "--role", "client").stdout
    )  # fmt: skip
    ca = args.data_dir / "tls" / "ca.pem"
    on_port, off_port = args.port + 2, args.port + 3
    servers = [
        serve_gateway(args, on_port),
        _spawn(args, __file__, "--auth-off-serve", "--port", str(off_port), "--data-dir", str(args.data_dir)),
    ]  # fmt: skip
    try:
        _, body = make_inputs(warm_engine(args.engine))["verify-proof"]
        await _wait_ready(f"https://127.0.0.1:{on_port}/readyz", ca)
        await _wait_ready(f"https://127.0.0.1:{off_port}/readyz", ca)
        runs: dict[str, list[dict[str, float]]] = {"off": [], "key": []}
        sides = (("off", off_port, {}), ("key", on_port, {"X-API-Key": created["api_key"]}))
        for _ in range(args.rounds):
            for name, port, headers in sides:
                url = f"https://127.0.0.1:{port}/v1/kzg/verify-proof"
                seconds = args.seconds / args.rounds
                runs[name].append(await drive(url, body, headers, ca, args.concurrency, seconds))
        off, key = (sorted(runs[n], key=lambda r: r["rps"])[args.rounds // 2] for n in runs)
        ratio = key["rps"] / off["rps"]
        print("verify-proof, authentication:")
        print(_row("auth disabled", off) + f"  errors {off['errors']}")
        print(_row("API key", key) + f"  errors {key['errors']}")
        ok = ratio >= 0.95
        print(f"  {'API key / auth disabled throughput':<44} {ratio:7.2f}  (target >= 0.95)  "
              f"{'ok' if ok else 'MISSED'}")  # fmt: skip
        return 0 if ok and not key["errors"] and not off["errors"] else 1
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


async def cross_check_cost(args: argparse.Namespace) -> int:
    """The gateway on ``--engine`` alone and with ``[engine] cross_check`` = the other
    engine (two gateways, each on its own data directory), in alternating runs of each
    measured operation: throughput and p50 of both and what the check costs."""
    from gateway.pool import warm_engine

    other = next(name for name in ("blspy", "ckzg") if name != args.engine)
    sides: dict[str, tuple[argparse.Namespace, int, dict[str, str]]] = {}
    for offset, (name, extra) in enumerate(
        (("alone", {}), ("checked", {"KZG_GATEWAY_ENGINE__CROSS_CHECK": other}))
    ):
        side = argparse.Namespace(**vars(args))
        side.data_dir = args.data_dir / name
        side.env = {**args.env, **extra}
        _gateway(side, "init")
        created = json.loads(
            _gateway(side, "admin", "api-keys", "create", "--name", "cc", "--role", "client").stdout
        )
        sides[name] = (side, args.port + 7 + offset, {"X-API-Key": created["api_key"]})
    servers = [serve_gateway(side, port) for side, port, _ in sides.values()]
    try:
        inputs = make_inputs(warm_engine(args.engine))
        for side, port, _ in sides.values():
            await _wait_ready(f"https://127.0.0.1:{port}/readyz", side.data_dir / "tls" / "ca.pem")
        print(f"cross-check: {args.engine} answers, {other} checks; {args.workers} workers, "
              f"{os.cpu_count()} cores, {args.concurrency} clients")  # fmt: skip
        for op in args.ops.split(","):
            _, body = inputs[op]
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, (side, port, headers) in sides.items():
                    url = f"https://127.0.0.1:{port}/v1/kzg/{op}"
                    ca = side.data_dir / "tls" / "ca.pem"
                    seconds = args.seconds / args.rounds
                    runs[name].append(
                        await drive(url, body, headers, ca, args.concurrency, seconds)
                    )
            alone, checked = (_median(runs[name]) for name in sides)
            ratio = checked["rps"] / alone["rps"]
            print(f"{op}:")
            print(_row(f"{args.engine} alone", alone) + f"  errors {alone['errors']}")
            print(_row(f"{args.engine} + {other}", checked) + f"  errors {checked['errors']}")
            print(f"  {'throughput checked / alone':<44} {ratio:7.2f}  "
                  f"(cost {1 - ratio:.0%} of throughput, p50 +{checked['p50'] - alone['p50']:.1f} ms)")  # fmt: skip
        return 0
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


def _metric(text: str, name: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _delta(after: list[str], before: list[str], name: str) -> float:
    """How much ``name`` grew over the run, summed over the instances."""
    return sum(_metric(a, name) - _metric(b, name) for a, b in zip(after, before, strict=True))


async def _metrics(url: str, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
        return await response.text()


async def scale_out(args: argparse.Namespace) -> int:
    """One and then two gateway instances (separate processes and ports) on one
    PostgreSQL against the bare baseline, for verify-proof and verify-blob-proof: the
    throughput and p95 of each, each configuration's overhead against the baseline, and
    where a request's time goes (engine, audit commit, the rest: TLS, HTTP, auth)."""
    from gateway.pool import warm_engine

    if not args.database_url:
        print("--scale-out needs --database-url (instances share one PostgreSQL)")
        return 2
    _gateway(args, "init")
    created = json.loads(
        _gateway(args, "admin", "api-keys", "create", "--name", "scale", "--role", "client").stdout
    )
    headers = {"X-API-Key": created["api_key"]}
    ca = args.data_dir / "tls" / "ca.pem"
    ports = [args.port + 4, args.port + 5]
    base_port = args.port + 6
    servers = [*(serve_gateway(args, port) for port in ports), serve_baseline(args, base_port)]
    try:
        engine = warm_engine(args.engine)
        inputs = make_inputs(engine)
        for port in ports:
            await _wait_ready(f"https://127.0.0.1:{port}/readyz", ca)
        await _wait_ready(f"https://127.0.0.1:{base_port}/", ca)
        print(f"scale-out on PostgreSQL: engine {args.engine}, {args.workers} workers per "
              f"instance, {os.cpu_count()} cores shared by every server and the clients")  # fmt: skip
        for op in ("verify-proof", "verify-blob-proof"):
            engine_args, body = inputs[op]
            path = f"/v1/kzg/{op}"
            raw = raw_engine_loop(engine, OPERATIONS[op], engine_args, args.seconds)
            urls = [f"https://127.0.0.1:{port}{path}" for port in ports]
            before = [await _metrics(f"https://127.0.0.1:{p}/metrics", ca) for p in ports]
            # Alternate short runs of the three set-ups so that whatever else loads the
            # machine hits each alike; the median run of each is reported.
            seconds = args.seconds / args.rounds
            half = max(1, args.concurrency // 2)
            runs: dict[str, list[dict[str, float]]] = {"base": [], "one": [], "two": []}
            for _ in range(args.rounds):
                runs["base"].append(await drive(f"https://127.0.0.1:{base_port}{path}", body,
                                                {}, ca, args.concurrency, seconds))  # fmt: skip
                runs["one"].append(
                    await drive(urls[0], body, headers, ca, args.concurrency, seconds)
                )
                pair = await asyncio.gather(
                    *(drive(url, body, headers, ca, half, seconds) for url in urls)
                )
                runs["two"].append({"rps": sum(r["rps"] for r in pair),
                                    "errors": sum(r["errors"] for r in pair),
                                    **{q: max(r[q] for r in pair) for q in ("p50", "p95", "p99")}})  # fmt: skip
            after = [await _metrics(f"https://127.0.0.1:{p}/metrics", ca) for p in ports]
            base, one, two = (_median(runs[n]) for n in ("base", "one", "two"))
            print(f"{op}:")
            print(_row("raw engine (1 loop)", raw))
            print(_row("bare aiohttp + pool", base) + f"  errors {base['errors']}")
            print(_row("1 instance", one) + f"  errors {one['errors']}"
                  f"  overhead {1 - one['rps'] / base['rps']:+.0%}")  # fmt: skip
            print(_row("2 instances", two) + f"  errors {two['errors']}"
                  f"  overhead {1 - two['rps'] / base['rps']:+.0%}"
                  f"  scaling {two['rps'] / one['rps']:.2f}x")  # fmt: skip
            commits = _delta(after, before, "kzg_audit_commit_seconds_count")
            commit_s = _delta(after, before, "kzg_audit_commit_seconds_sum")
            batched = _delta(after, before, "kzg_audit_batch_size_sum")
            commit_ms = 1000 * commit_s / commits if commits else 0.0
            engine_cores = two["rps"] * raw["p50"] / 1000
            rest_ms = max(two["p50"] - raw["p50"] - commit_ms, 0.0)
            print(f"  time of a request at p50 ({two['p50']:.1f} ms): engine {raw['p50']:.2f} ms, "
                  f"audit commit {commit_ms:.2f} ms (batches of {batched / max(commits, 1):.1f}), "
                  f"the rest (TLS, HTTP, auth, queueing) "
                  f"{rest_ms:.2f} ms")  # fmt: skip
            shares = {
                "engine": raw["p50"],
                "audit commit": commit_ms,
                "TLS/HTTP/auth/queue": rest_ms,
            }
            busy = max(shares, key=lambda k: shares[k])
            print(f"  engine work uses {engine_cores:.2f} of {os.cpu_count()} cores at 2 instances: "
                  f"bottleneck: {busy}")  # fmt: skip
        return 0
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
