"""``kzg-gateway``: init, serve, audit, doctor, admin, jobs."""

from __future__ import annotations

import argparse
import logging
import sys

from auth.crypto import MasterKeyError
from auth.policy import PolicyError
from gateway.cli import admin, audit, doctor, serve
from gateway.settings import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kzg-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve.register(commands)
    audit.register(commands)
    doctor.register(commands)
    admin.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, MasterKeyError, PolicyError) as exc:
        print(f"kzg-gateway: {exc}", file=sys.stderr)
        return 2
