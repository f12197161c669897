"""The field side of EIP-4844 against its defining formulas: inverses by halving, the
combined evaluation and quotient, blob parsing."""

from __future__ import annotations

import random

import pytest

from kzg import KZGError
from kzg.eip4844 import (
    compute_quotient,
    evaluate_polynomial,
    evaluate_with_quotient,
    roots_of_unity_brp,
)
from kzg.field import BLS_MODULUS as R
from kzg.field import FIELD_ELEMENTS_PER_BLOB, batch_inverse
from kzg.validate import blob_to_polynomial


def _quotient_by_definition(poly: list[int], z: int, y: int) -> list[int]:
    inverses = batch_inverse([(w - z) % R for w in roots_of_unity_brp()])
    return [(f - y) * d % R for f, d in zip(poly, inverses, strict=True)]


@pytest.mark.parametrize("seed", [1, 2])
def test_evaluation_and_quotient_outside_the_domain(seed: int) -> None:
    rng = random.Random(seed)
    poly = [rng.randrange(R) for _ in range(FIELD_ELEMENTS_PER_BLOB)]
    for z in (rng.randrange(R), R - 1 - 5, 2):
        y, quotient = evaluate_with_quotient(poly, z)
        assert y == evaluate_polynomial(poly, z)
        assert quotient == _quotient_by_definition(poly, z, y)
        assert compute_quotient(poly, z, y) == quotient


def test_evaluation_and_quotient_inside_the_domain() -> None:
    rng = random.Random(3)
    poly = [rng.randrange(R) for _ in range(FIELD_ELEMENTS_PER_BLOB)]
    for index in (0, 1, 2, 4095):
        z = roots_of_unity_brp()[index]
        y, quotient = evaluate_with_quotient(poly, z)
        assert y == poly[index] == evaluate_polynomial(poly, z)
        assert quotient == compute_quotient(poly, z, y)
        # q·(X − z) + y agrees with p everywhere but at z, where q is the derivative term.
        for i, w in enumerate(roots_of_unity_brp()[:64]):
            if i != index:
                assert (quotient[i] * (w - z) + y) % R == poly[i]


def test_blob_parsing_names_the_first_bad_element() -> None:
    elements = [0] * FIELD_ELEMENTS_PER_BLOB
    elements[7] = R - 1
    elements[9] = R
    blob = b"".join(x.to_bytes(32, "big") for x in elements)
    with pytest.raises(KZGError, match="element 9"):
        blob_to_polynomial(blob)
    elements[9] = 5
    good = b"".join(x.to_bytes(32, "big") for x in elements)
    assert blob_to_polynomial(good) == elements
