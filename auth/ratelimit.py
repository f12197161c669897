"""Token buckets per principal (``rate`` tokens a second up to ``burst``), shared by
every instance on one database.

Each request is decided from this process's buckets alone, so the hot path never
waits on the database. ``UsageExchange`` then publishes, every few tenths of a second,
what this instance spent per key and charges each bucket with what the other instances
spent, so N instances together admit one principal's rate, not N times it. Between two
exchanges an instance may admit up to one interval's worth (and at first contact one
burst) beyond the shared bucket; the debt is repaid from later tokens.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from auth.models import rate_usage

log = logging.getLogger(__name__)


def client_group(host: str | None) -> str:
    """The unit per-address limits count: an IPv4 address, or an IPv6 /64 (one
    subscriber's network, all of whose addresses one client may use)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or ""
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


@dataclass
class _Bucket:
    tokens: float
    updated: float
    rate: float
    burst: float


class RateLimiter:
    """In-process buckets; pair with a UsageExchange to share them across instances."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._max_keys = max_keys
        self._spent: Counter[str] = Counter()

    def _bucket(self, key: str, rate: float, burst: float) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                # Full buckets carry no state worth keeping: drop them to bound memory.
                self._buckets = {
                    k: b
                    for k, b in self._buckets.items()
                    if b.tokens + (now - b.updated) * b.rate < b.burst
                }
            bucket = self._buckets[key] = _Bucket(burst, now, rate, burst)
        bucket.rate, bucket.burst = rate, burst
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        return bucket

    def take(self, key: str, rate: float, burst: float) -> float:
        """Spend one token; return 0 when allowed, else the seconds until one is free."""
        bucket = self._bucket(key, rate, burst)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            self._spent[key] += 1
            return 0.0
        return _until_one(bucket)

    def wait(self, key: str, rate: float, burst: float) -> float:
        """The seconds until ``take`` would succeed (0 now), spending nothing."""
        if key not in self._buckets:
            return 0.0  # an unknown key is a full bucket: no need to remember it yet
        bucket = self._bucket(key, rate, burst)
        return 0.0 if bucket.tokens >= 1 else _until_one(bucket)

    def charge(self, key: str, tokens: float, rate: float, burst: float) -> None:
        """Remove tokens spent elsewhere; the bucket may go into debt down to -burst."""
        bucket = self._bucket(key, rate, burst)
        bucket.tokens = max(-burst, bucket.tokens - tokens)

    def spent(self) -> dict[str, tuple[int, float, float]]:
        """Tokens spent here since ``forget_spent`` was last told of them, with each
        key's rate and burst."""
        # A bucket dropped to bound memory was full: whatever it spent is long repaid.
        self._spent = Counter({k: n for k, n in self._spent.items() if k in self._buckets})
        return {
            key: (count, self._buckets[key].rate, self._buckets[key].burst)
            for key, count in self._spent.items()
        }

    def forget_spent(self, published: dict[str, tuple[int, float, float]]) -> None:
        self._spent.subtract({key: count for key, (count, _, _) in published.items()})
        self._spent = +self._spent  # drop the keys that reached zero


def _until_one(bucket: _Bucket) -> float:
    return (1 - bucket.tokens) / bucket.rate if bucket.rate > 0 else float("inf")


class UsageExchange:
    """Publishes this instance's spending in ``rate_usage`` and charges the others'.

    Rows hold each instance's running total per key. A key idle for ``horizon`` seconds
    is no longer read, and its owner starts its total again from zero; the row itself is
    deleted (by whoever syncs first) only after twice that, so an owner never publishes
    an old total into a row others have forgotten. Instances' clocks are assumed to
    agree to well within the horizon (NTP)."""

    def __init__(
        self,
        engine: AsyncEngine,
        limiter: RateLimiter,
        horizon: float = 300.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance_id = uuid.uuid4().hex
        self._engine = engine
        self._limiter = limiter
        self._horizon = horizon
        self._wall = wall_clock
        self._totals: dict[str, tuple[float, float]] = {}  # key -> (total, last published)
        self._seen: dict[tuple[str, str], float] | None = None
        self._upsert = self._build_upsert()
        self._purged = float("-inf")

    def _build_upsert(self) -> sa.Insert:
        statement: postgresql.Insert | sqlite.Insert
        if self._engine.dialect.name == "postgresql":
            statement = postgresql.insert(rate_usage)
        else:
            statement = sqlite.insert(rate_usage)
        return statement.on_conflict_do_update(
            index_elements=[rate_usage.c.instance_id, rate_usage.c.key],
            set_={
                "spent": statement.excluded.spent,
                "rate": statement.excluded.rate,
                "burst": statement.excluded.burst,
                "updated_at": statement.excluded.updated_at,
            },
        )

    async def sync(self) -> float:
        """One exchange; return the tokens charged for other instances' spending."""
        now = self._wall()
        stale = now - self._horizon
        # A key idle past the horizon starts again from zero: others no longer read it.
        totals = {k: v for k, v in self._totals.items() if v[1] >= stale}
        published = self._limiter.spent()
        rows = []
        for key, (count, rate, burst) in published.items():
            total = totals.get(key, (0.0, now))[0] + count
            totals[key] = (total, now)
            rows.append(
                {
                    "instance_id": self.instance_id,
                    "key": key,
                    "spent": total,
                    "rate": rate,
                    "burst": burst,
                    "updated_at": now,
                }
            )
        async with self._engine.begin() as conn:
            if rows:
                await conn.execute(self._upsert, rows)
            others = (
                await conn.execute(
                    sa.select(rate_usage).where(
                        rate_usage.c.instance_id != self.instance_id,
                        rate_usage.c.updated_at >= stale,
                    )
                )
            ).all()
        # Only once published: a failed exchange leaves totals and spending to the next.
        self._totals = totals
        self._limiter.forget_spent(published)
        first = self._seen is None
        seen = self._seen or {}
        self._seen = {}
        charged = 0.0
        for row in others:
            ident = (row.instance_id, row.key)
            self._seen[ident] = row.spent
            before = seen.get(ident)
            # A total that went down belongs to a row deleted and started again.
            delta = row.spent if before is None or row.spent < before else row.spent - before
            if first or delta <= 0:
                continue  # what others spent before this instance started is not ours to pay
            self._limiter.charge(row.key, delta, row.rate, row.burst)
            charged += delta
        # Apart and last, so that the delete never holds up (or deadlocks with) the
        # publishing, and its failure loses nothing; once a horizon is often enough for
        # rows that expire after two, and spares a write transaction per exchange.
        if now - self._purged >= self._horizon:
            async with self._engine.begin() as conn:
                expired = now - 2 * self._horizon
                await conn.execute(sa.delete(rate_usage).where(rate_usage.c.updated_at < expired))
            self._purged = now
        return charged
