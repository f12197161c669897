"""Engines shared by the KZG tests: each loaded once per session, tables cached in a
session directory so the blspy engine's cold build is exercised on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from kzg import Engine, load_engine
from tests.conftest import missing


@pytest.fixture(scope="session")
def kzg_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kzg-cache")


@pytest.fixture(scope="session")
def blspy_engine(kzg_cache_dir: Path) -> Engine:
    return load_engine("blspy", cache_dir=kzg_cache_dir)


@pytest.fixture(scope="session")
def ckzg_engine() -> Engine:
    try:
        import ckzg  # noqa: F401
    except ImportError:
        missing("ckzg (pip install 'kzg-gateway[ckzg]')")
    return load_engine("ckzg")


@pytest.fixture(scope="session", params=["blspy", "ckzg"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(f"{request.param}_engine")
