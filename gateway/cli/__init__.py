"""The ``kzg-gateway`` command line: ``main.py`` builds the parser from each command
group's ``register``: ``serve.py`` (init, serve, jobs), ``audit.py``, ``doctor.py`` and
``admin.py``."""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit.events import AuditEvent
from gateway.config import cli_actor


def common_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``, which every command that reads the configuration takes."""
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./.kzg-gateway)")


def cli_event(action: str, outcome: str, detail: dict[str, Any]) -> AuditEvent:
    """The audit record of a command run by hand, attributed to the OS account."""
    return AuditEvent(
        request_id=f"cli-{uuid.uuid4().hex}",
        occurred_at=datetime.now(UTC),
        actor=cli_actor(),
        role="operator",
        action=action,
        outcome=outcome,
        detail=detail,
    )
