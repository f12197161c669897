"""The group arithmetic the blspy engine builds on blspy, against generator multiples."""

from __future__ import annotations

import random

import pytest
from blspy import G1Element

from kzg.curve import FixedBaseMSM, g1_generator_mul, g1_lincomb, g1_mul
from kzg.field import BLS_MODULUS

R = BLS_MODULUS
EDGE_SCALARS = [0, 1, 2, R - 1, R - 2, R // 2, R // 2 + 1, (1 << 253) - 1, 1 << 253, (1 << 248) - 1]


def _expected(scalars: list[int], logs: list[int]) -> G1Element:
    return g1_generator_mul(sum(s * k for s, k in zip(scalars, logs, strict=True)))


@pytest.mark.parametrize("k", EDGE_SCALARS)
def test_scalar_multiplication_edges(k: int) -> None:
    base = g1_generator_mul(123456789)
    assert g1_mul(base, k) == g1_generator_mul(123456789 * k)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 33, 81, 201, 520])
def test_variable_base_msm_matches_the_sum(n: int) -> None:
    rng = random.Random(n)
    logs = [rng.randrange(R) for _ in range(n)]
    scalars = [
        rng.choice(EDGE_SCALARS) if rng.random() < 0.3 else rng.randrange(R) for _ in range(n)
    ]
    points = [g1_generator_mul(k) for k in logs]
    assert g1_lincomb(points, scalars) == _expected(scalars, logs)


def test_variable_base_msm_with_identity_points_and_zero_scalars() -> None:
    points = [G1Element(), g1_generator_mul(5), g1_generator_mul(9)]
    assert g1_lincomb(points, [3, 7, 0]) == g1_generator_mul(35)
    assert g1_lincomb(points, [0, 0, 0]) == G1Element()


@pytest.mark.parametrize(
    ("c", "windows"), [(2, None), (5, None), (8, None), (13, 10), (8, 7), (5, 1)]
)
def test_fixed_base_msm_matches_the_sum(c: int, windows: int | None) -> None:
    # windows below what 255-bit scalars need: the compact table, scalars in chunks.
    rng = random.Random(c)
    logs = [rng.randrange(R) for _ in range(40)]
    table = FixedBaseMSM.build([g1_generator_mul(k) for k in logs], c, windows=windows)
    for scalars in (
        [rng.randrange(R) for _ in logs],
        [rng.choice(EDGE_SCALARS) for _ in logs],
        [0] * 39 + [R - 1],
        [rng.randrange(1 << 248) if i % 3 else 0 for i in range(40)],
    ):
        assert table.lincomb(scalars) == _expected(scalars, logs)
    assert table.lincomb([0] * 40) == G1Element()
