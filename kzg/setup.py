"""Loading and validating the KZG trusted setup (Ethereum ceremony text format)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TypeVar

from blspy import G1Element, G2Element

from .errors import KZGError
from .field import FIELD_ELEMENTS_PER_BLOB, bit_reversal_permutation

NUM_G2_POINTS = 65
BYTES_PER_G1 = 48
BYTES_PER_G2 = 96

# A setup point: G1 or G2, as the caller asks.
Point = TypeVar("Point", G1Element, G2Element)


@dataclass(frozen=True)
class TrustedSetup:
    """The ceremony output, validated: every point on its curve and in its subgroup."""

    sha256: str
    g1_lagrange_brp: list[G1Element] = field(repr=False)
    g2_monomial: list[G2Element] = field(repr=False)
    g1_monomial: list[G1Element] = field(repr=False)
    path: Path | None = None


def bundled_setup_path() -> Path:
    """Return the path of the mainnet setup shipped in this package."""
    return Path(str(resources.files("kzg").joinpath("trusted_setup.txt")))


def _hex_points(lines: list[str], start: int, count: int, size: int, what: str) -> list[bytes]:
    raws = []
    for i in range(count):
        text = lines[start + i].strip()
        try:
            raw = bytes.fromhex(text.removeprefix("0x"))
        except ValueError as exc:
            raise KZGError(f"trusted setup: {what}[{i}] is not hex") from exc
        if len(raw) != size:
            raise KZGError(f"trusted setup: {what}[{i}] has {len(raw)} bytes, expected {size}")
        raws.append(raw)
    return raws


def _points(raws: list[bytes], cls: type[Point], what: str) -> list[Point]:
    points: list[Point] = []
    for i, raw in enumerate(raws):
        try:
            points.append(cls.from_bytes(raw))
        except Exception as exc:
            raise KZGError(f"trusted setup: {what}[{i}] is not a valid point") from exc
    return points


@dataclass(frozen=True)
class SetupBytes:
    """A setup file split into its encoded points, not yet checked as curve points."""

    sha256: str
    g1_lagrange: list[bytes]
    g2_monomial: list[bytes]
    g1_monomial: list[bytes]


def read_setup_bytes(path: str | Path | None = None) -> SetupBytes:
    """Read a setup file and check its shape (counts, hex, lengths)."""
    p = Path(path) if path is not None else bundled_setup_path()
    data = p.read_bytes()
    lines = [ln for ln in data.decode("ascii", errors="replace").splitlines() if ln.strip()]
    try:
        n_g1, n_g2 = int(lines[0]), int(lines[1])
    except (IndexError, ValueError) as exc:
        raise KZGError("trusted setup: header must hold the G1 and G2 point counts") from exc
    if n_g1 != FIELD_ELEMENTS_PER_BLOB or n_g2 != NUM_G2_POINTS:
        raise KZGError(
            f"trusted setup: expected {FIELD_ELEMENTS_PER_BLOB} G1 and {NUM_G2_POINTS} G2 points,"
            f" got {n_g1} and {n_g2}"
        )
    if len(lines) != 2 + 2 * n_g1 + n_g2:
        raise KZGError(f"trusted setup: expected {2 + 2 * n_g1 + n_g2} lines, got {len(lines)}")
    return SetupBytes(
        sha256=hashlib.sha256(data).hexdigest(),
        g1_lagrange=_hex_points(lines, 2, n_g1, BYTES_PER_G1, "g1_lagrange"),
        g2_monomial=_hex_points(lines, 2 + n_g1, n_g2, BYTES_PER_G2, "g2_monomial"),
        g1_monomial=_hex_points(lines, 2 + n_g1 + n_g2, n_g1, BYTES_PER_G1, "g1_monomial"),
    )


def load_trusted_setup(path: str | Path | None = None) -> TrustedSetup:
    """Parse and validate a trusted setup file (the bundled mainnet one by default)."""
    p = Path(path) if path is not None else bundled_setup_path()
    raw = read_setup_bytes(p)
    return TrustedSetup(
        sha256=raw.sha256,
        g1_lagrange_brp=bit_reversal_permutation(
            _points(raw.g1_lagrange, G1Element, "g1_lagrange")
        ),
        g2_monomial=_points(raw.g2_monomial, G2Element, "g2_monomial"),
        g1_monomial=_points(raw.g1_monomial, G1Element, "g1_monomial"),
        path=p,
    )
