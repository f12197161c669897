"""The first administrator of a fresh gateway (``kzg-gateway init``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from auth.crypto import MasterKey
from auth.models import jwt_keys, users
from auth.policy import RbacPolicy, SecurityPolicy
from auth.service import CURRENT, AuthService


async def ensure_first_admin(
    engine: AsyncEngine,
    master_key: MasterKey,
    rbac: RbacPolicy,
    policy: SecurityPolicy,
    username: str = "admin",
) -> dict[str, Any] | None:
    """Create ``username`` with the admin role when no user exists yet, and the first JWT
    signing key when none is current. Returns {username, password, totp_secret} only when
    the admin was created (the one time they are shown); None otherwise."""
    service = AuthService(engine, master_key, rbac, policy)
    async with engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(users))).scalar_one()
        has_key = (
            await conn.execute(select(jwt_keys.c.kid).where(jwt_keys.c.status == CURRENT))
        ).first()
    if has_key is None:
        await service.rotate_jwt_key()
    if count:
        return None
    created = await service.create_user(username, ["admin"])
    return {
        "username": created["username"],
        "password": created["password"],
        "totp_secret": created["totp_secret"],
    }
