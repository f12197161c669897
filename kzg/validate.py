"""Input validation shared by both engines: each check returns the parsed value or raises
a KZGError naming the argument (and index, for an item of a list) and what is wrong.

The blspy engine parses its inputs with these; the ckzg engine runs them only after
c-kzg-4844 has refused a call, to name the argument at fault (c-kzg's message does not).
"""

from __future__ import annotations

from typing import Any

from blspy import G1Element

from .eip7594.cells import BYTES_PER_CELL, CELLS_PER_EXT_BLOB
from .errors import KZGError
from .field import BLS_MODULUS, BYTES_PER_BLOB, BYTES_PER_FIELD_ELEMENT
from .setup import BYTES_PER_G1

_ELEMENT_SLICES = tuple(
    slice(i, i + BYTES_PER_FIELD_ELEMENT) for i in range(0, BYTES_PER_BLOB, BYTES_PER_FIELD_ELEMENT)
)


def check_bytes(value: object, size: int, argument: str, index: int | None = None) -> bytes:
    """Return ``value`` as bytes of exactly ``size``."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise KZGError(f"expected bytes, got {type(value).__name__}", argument, index)
    if len(value) != size:
        raise KZGError(f"expected {size} bytes, got {len(value)}", argument, index)
    return bytes(value)


def check_list(value: object, argument: str) -> list[Any]:
    """``value`` as a list, unless it is neither a list nor a tuple."""
    if not isinstance(value, list | tuple):
        raise KZGError(f"expected a list, got {type(value).__name__}", argument)
    return list(value)


def field_from_bytes(value: object, argument: str, index: int | None = None) -> int:
    """Return the canonical field element in ``value`` (32 bytes, big-endian, < r)."""
    x = int.from_bytes(check_bytes(value, BYTES_PER_FIELD_ELEMENT, argument, index), "big")
    if x >= BLS_MODULUS:
        raise KZGError("not a canonical field element (>= BLS_MODULUS)", argument, index)
    return x


def blob_to_polynomial(blob: object, argument: str = "blob", index: int | None = None) -> list[int]:
    """Return the blob's 4096 field elements, unless one is not canonical."""
    data = check_bytes(blob, BYTES_PER_BLOB, argument, index)
    # int.from_bytes is big-endian by default; map keeps the 4096 slices and conversions
    # out of the interpreter loop (~1/3 faster than a comprehension).
    poly = list(map(int.from_bytes, map(data.__getitem__, _ELEMENT_SLICES)))
    if max(poly) >= BLS_MODULUS:
        bad = next(i for i, x in enumerate(poly) if x >= BLS_MODULUS)
        raise KZGError(f"field element {bad} is not canonical (>= BLS_MODULUS)", argument, index)
    return poly


def cell_to_evals(cell: object, argument: str, index: int | None = None) -> list[int]:
    """The 64 field elements of a cell, unless one is not canonical."""
    data = check_bytes(cell, BYTES_PER_CELL, argument, index)
    step = BYTES_PER_FIELD_ELEMENT
    evals = [int.from_bytes(data[i : i + step], "big") for i in range(0, BYTES_PER_CELL, step)]
    for j, value in enumerate(evals):
        if value >= BLS_MODULUS:
            raise KZGError(f"field element {j} is not canonical (>= BLS_MODULUS)", argument, index)
    return evals


def check_cell_index(value: object, argument: str, index: int | None = None) -> int:
    """``value`` as a cell index: an integer in 0..127."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KZGError("expected an integer cell index", argument, index)
    if not 0 <= value < CELLS_PER_EXT_BLOB:
        reason = f"cell index {value} out of range 0..{CELLS_PER_EXT_BLOB - 1}"
        raise KZGError(reason, argument, index)
    return value


def g1_from_bytes(data: object, argument: str, index: int | None = None) -> G1Element:
    """Return the G1 point encoded in ``data``, unless it is not a compressed point on the
    curve and in the subgroup (the identity included)."""
    raw = check_bytes(data, BYTES_PER_G1, argument, index)
    try:
        return G1Element.from_bytes(raw)
    except (ValueError, RuntimeError) as exc:
        raise KZGError(f"not a valid G1 point ({exc})", argument, index) from exc
