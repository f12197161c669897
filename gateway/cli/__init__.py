"""The ``kzg-gateway`` command line: ``main.py`` builds the parser from each command
group's ``register``: ``serve.py`` (init, serve, jobs), ``audit.py``, ``doctor.py`` and
``admin.py``."""

from __future__ import annotations

import argparse
from pathlib import Path


def common_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--data-dir``, which every command that reads the configuration takes."""
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--data-dir", type=Path, help="data directory (default ./.kzg-gateway)")
