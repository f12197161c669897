"""The gateway's own database connections cannot lower the retention floor nor change
the schema: on PostgreSQL by the runtime role's grants, on SQLite by the authorizer the
gateway puts on each of its connections. The gateway works as usual under them."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from gateway.appkeys import DB_ENGINE
from tests.gateway.conftest import Gateway
from tests.gateway.helpers import IDENTITY_PROOF


async def test_the_gateways_own_connection_cannot_lower_the_floor_or_drop_a_guard(
    gateway: Gateway,
) -> None:
    engine = gateway.app[DB_ENGINE]
    refused = [
        "UPDATE audit_retention SET keep_years = 1",
        "INSERT INTO audit_retention (id, keep_years) VALUES (2, 1)",
        "DELETE FROM audit_retention",
    ]
    if gateway.kind == "sqlite":
        refused += [
            "DROP TRIGGER audit_events_no_delete",
            "CREATE TRIGGER t BEFORE INSERT ON audit_events BEGIN SELECT 1; END",
            "ALTER TABLE audit_events ADD COLUMN x TEXT",
            "PRAGMA writable_schema = ON",
            "PRAGMA ignore_check_constraints = ON",
            "ATTACH DATABASE ':memory:' AS other",
        ]
    else:
        refused += [
            "DROP TRIGGER audit_events_no_delete ON audit_events",
            "ALTER TABLE audit_events ADD COLUMN x TEXT",
        ]
    for statement in refused:
        with pytest.raises(DBAPIError, match=r"not authorized|permission denied|must be owner"):
            async with engine.begin() as conn:
                await conn.execute(text(statement))
    async with engine.connect() as conn:
        floor = (await conn.execute(text("SELECT keep_years FROM audit_retention"))).all()
        assert floor == [(7,)]

    # Everything the gateway does still works: a KZG call is answered and audited.
    response, answer = await gateway.post("/v1/kzg/verify-proof", IDENTITY_PROOF)
    assert response.status == 200 and answer["valid"] is True
    assert await gateway.audit_records(response.headers["X-Request-ID"])
