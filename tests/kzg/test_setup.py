"""The bundled trusted setup loads, validates and is the ceremony output we were given."""

import hashlib

import pytest

from kzg.errors import KZGError
from kzg.setup import bundled_setup_path, load_trusted_setup


def test_bundled_setup_matches_shared_copy(spec_tests_dir):
    shared = spec_tests_dir.parent / "trusted_setup.txt"
    assert bundled_setup_path().read_bytes() == shared.read_bytes()


def test_bundled_setup_loads_every_point():
    setup = load_trusted_setup()
    assert len(setup.g1_lagrange_brp) == 4096
    assert len(setup.g2_monomial) == 65
    assert len(setup.g1_monomial) == 4096
    assert setup.sha256 == hashlib.sha256(bundled_setup_path().read_bytes()).hexdigest()


def test_malformed_setup_is_rejected_with_the_point_named(tmp_path):
    lines = bundled_setup_path().read_text().splitlines()
    lines[2 + 7] = "a" * 96  # g1_lagrange[7]: 48 bytes that do not decode to a point
    bad = tmp_path / "setup.txt"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(KZGError, match=r"g1_lagrange\[7\]"):
        load_trusted_setup(bad)


def test_truncated_setup_is_rejected(tmp_path):
    lines = bundled_setup_path().read_text().splitlines()
    bad = tmp_path / "setup.txt"
    bad.write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(KZGError, match="lines"):
        load_trusted_setup(bad)
