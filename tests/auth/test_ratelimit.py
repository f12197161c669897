"""Rate-limit buckets and their sharing between instances through a real database
(SQLite and PostgreSQL, the runtime role): several instances together admit one
principal's rate, not one rate each."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from auth.models import rate_usage
from auth.ratelimit import RateLimiter, UsageExchange, client_group
from gateway.db import make_engine, migrate
from gateway.security import client_bucket
from tests.auth.conftest import Store

KEY = "principal:k1"
RATE, BURST = 2.0, 5.0


class Clock:
    """Time that moves only when the test moves it (buckets and exchanges share it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _drain(limiter: RateLimiter) -> int:
    """Take tokens until refused; return how many were granted."""
    granted = 0
    while limiter.take(KEY, RATE, BURST) == 0:
        granted += 1
    return granted


def test_bucket_grants_burst_then_rate_and_says_when_to_retry() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    assert _drain(limiter) == BURST
    assert limiter.take(KEY, RATE, BURST) == 1 / RATE
    clock.advance(1.0)
    assert _drain(limiter) == RATE
    clock.advance(60.0)
    assert _drain(limiter) == BURST  # refills up to the burst, not beyond


def test_charges_may_leave_a_bounded_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.charge(KEY, 100, RATE, BURST)
    # Full (5) minus 100, floored at -burst: 5 tokens of debt before anything is granted.
    assert limiter.take(KEY, RATE, BURST) == (1 + BURST) / RATE
    clock.advance((1 + BURST) / RATE)
    assert _drain(limiter) == 1


async def test_two_instances_admit_one_shared_rate(store: Store) -> None:
    clock = Clock()
    a, b = RateLimiter(clock), RateLimiter(clock)
    xa = UsageExchange(store.engine, a, wall_clock=clock)
    xb = UsageExchange(store.engine, b, wall_clock=clock)
    await xa.sync()
    await xb.sync()
    granted = []
    for _ in range(20):  # 10 s in exchanges every 0.5 s, both instances saturated
        granted.append(_drain(a) + _drain(b))
        await xa.sync()
        await xb.sync()
        clock.advance(0.5)
    total = sum(granted)
    alone = BURST + RATE * 10  # what one bucket admits in 10 s
    # Unshared, the two would admit 2 * alone = 50; shared, one burst and one
    # exchange interval's worth of lag beyond the shared bucket at most.
    assert alone <= total <= alone + BURST, granted
    # Once the bursts are spent the pair keeps to the rate (5 s at 2/s, give or take
    # one token in flight between exchanges).
    assert sum(granted[-10:]) <= RATE * 5 + 1, granted


async def test_an_instance_pays_only_for_spending_after_it_joined(store: Store) -> None:
    clock = Clock()
    a, late = RateLimiter(clock), RateLimiter(clock)
    xa = UsageExchange(store.engine, a, wall_clock=clock)
    assert _drain(a) == BURST
    await xa.sync()
    x_late = UsageExchange(store.engine, late, wall_clock=clock)
    assert await x_late.sync() == 0
    clock.advance(1.0)
    assert _drain(a) == RATE
    await xa.sync()
    assert await x_late.sync() == RATE
    assert late.take(KEY, RATE, BURST) == 0  # 5 - 2 left: still admits


async def test_idle_keys_start_again_from_zero_and_are_deleted(store: Store) -> None:
    clock = Clock()
    a, b = RateLimiter(clock), RateLimiter(clock)
    xa = UsageExchange(store.engine, a, horizon=60, wall_clock=clock)
    xb = UsageExchange(store.engine, b, horizon=60, wall_clock=clock)
    await xb.sync()
    assert _drain(a) == BURST
    await xa.sync()
    assert await xb.sync() == BURST
    clock.advance(61)  # idle past the horizon: no longer read, the total restarts
    assert await xb.sync() == 0
    assert a.take(KEY, RATE, BURST) == 0
    await xa.sync()
    assert await _spent(store) == [1.0]
    assert await xb.sync() == 1
    clock.advance(121)  # idle past twice the horizon: the row goes
    await xb.sync()
    assert await _spent(store) == [], "an idle row outlived twice the horizon"


async def test_a_failed_exchange_publishes_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "rate.db"
    url = f"sqlite+aiosqlite:///{path}"
    await migrate(url)
    engine = make_engine(url, busy_timeout=0.2)
    clock = Clock()
    limiter = RateLimiter(clock)
    exchange = UsageExchange(engine, limiter, wall_clock=clock)
    for _ in range(3):
        assert limiter.take(KEY, RATE, BURST) == 0
    lock = sqlite3.connect(path)
    lock.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    with pytest.raises(OperationalError, match="locked"):
        await exchange.sync()
    lock.rollback()
    lock.close()
    await exchange.sync()
    async with engine.connect() as conn:
        spent = list((await conn.execute(sa.select(rate_usage.c.spent))).scalars())
    await engine.dispose()
    assert spent == [3.0], "the spending of the failed exchange was published twice"


async def _spent(store: Store) -> list[float]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(sa.select(rate_usage.c.spent))).scalars())


def test_client_group_is_the_ipv4_address_or_the_ipv6_64() -> None:
    one = client_group("2001:db8:1:2::1")
    assert one == client_group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:3::1") != one
    assert client_group("::ffff:10.0.0.1") == client_group("10.0.0.1") == "10.0.0.1"
    assert client_group("10.0.0.1") != client_group("10.0.0.2")
    assert client_group(None) == client_group("") == ""


def test_addresses_of_one_ipv6_64_share_the_failure_and_anonymous_budgets() -> None:
    """Given a client walking through the addresses of its /64, when each address spends
    the budget, then they drain one bucket, while another /64 keeps its own."""
    limiter = RateLimiter(clock=Clock())
    for kind in ("fail", "addr"):
        walked = [f"2001:db8:0:7::{n:x}" for n in range(1, 10)]
        granted = sum(limiter.take(client_bucket(kind, addr), RATE, BURST) == 0 for addr in walked)
        assert granted == BURST, kind
        assert limiter.wait(client_bucket(kind, "2001:db8:0:7:abcd::1"), RATE, BURST) > 0
        assert limiter.wait(client_bucket(kind, "2001:db8:0:8::1"), RATE, BURST) == 0
        assert client_bucket(kind, "192.0.2.1") != client_bucket(kind, "192.0.2.2")


def test_wait_tells_when_a_token_is_free_without_spending_it() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    assert limiter.wait(KEY, RATE, BURST) == 0
    for _ in range(int(BURST)):
        assert limiter.wait(KEY, RATE, BURST) == 0
        assert limiter.take(KEY, RATE, BURST) == 0
    assert limiter.wait(KEY, RATE, BURST) == pytest.approx(1 / RATE)
    clock.advance(1 / RATE)
    assert limiter.wait(KEY, RATE, BURST) == 0
    assert limiter.take(KEY, RATE, BURST) == 0  # the peek spent nothing
