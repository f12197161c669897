"""Typed application keys: every shared resource of the app, opened in ``cleanup_ctx``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.writer import AuditWriter
from auth.crypto import MasterKey
from gateway.config import Config

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.pool import EnginePool
    from gateway.receipts import LogKeySigner
    from gateway.state import ServerState

CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
DB_ENGINE: web.AppKey[AsyncEngine] = web.AppKey("db_engine", AsyncEngine)
AUDIT_WRITER: web.AppKey[AuditWriter] = web.AppKey("audit_writer", AuditWriter)
MASTER_KEY: web.AppKey[MasterKey] = web.AppKey("master_key", MasterKey)
LOG_SIGNER: web.AppKey[LogKeySigner] = web.AppKey("log_signer")
KZG_POOL: web.AppKey[EnginePool] = web.AppKey("kzg_pool")
METRICS: web.AppKey[GatewayMetrics] = web.AppKey("metrics")
STATE: web.AppKey[ServerState] = web.AppKey("server_state")
# The routes anyone may call (gateway.identity.public_routes): every other one needs a
# credential, and the OpenAPI document says so.
PUBLIC_ROUTES: web.AppKey[frozenset[str]] = web.AppKey("public_routes", frozenset)
