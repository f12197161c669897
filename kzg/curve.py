"""G1/G2 arithmetic that blspy lacks: parsing with named errors, scalar multiplication,
and multi-scalar multiplication (variable and fixed base).

blspy offers point addition, negation, pairings and generator multiples
(``PrivateKey.get_g1``), each a C call of a few microseconds; everything here is
organised to make as few of those calls as possible, since Python overhead per call is
comparable to the addition itself.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce

from blspy import G1Element, PrivateKey

from .field import BLS_MODULUS

_HALF_MODULUS = BLS_MODULUS // 2


def g1_generator_mul(k: int) -> G1Element:
    """Return ``[k]G1`` for a field element ``k`` (blspy's fixed-base generator multiple)."""
    k %= BLS_MODULUS
    if k == 0:
        return G1Element()
    return PrivateKey.from_bytes(k.to_bytes(32, "big")).get_g1()


def g1_mul(point: G1Element, k: int) -> G1Element:
    """Return ``[k]point``: width-5 NAF over the precomputed odd multiples 1·P … 15·P."""
    k %= BLS_MODULUS
    if k > _HALF_MODULUS:
        point, k = point.negate(), BLS_MODULUS - k
    if k == 0:
        return G1Element()
    return _straus([(point, k)])


def _sum_buckets(pos: list[G1Element | None], neg: list[G1Element | None]) -> G1Element | None:
    """Return Σ k·(pos[k] − neg[k]) over k ≥ 1 with the running-sum trick (two additions per
    bucket); None entries are empty buckets."""
    running = None
    total = None
    for k in range(len(pos) - 1, 0, -1):
        p, n = pos[k], neg[k]
        if n is not None:
            n = n.negate()
            p = n if p is None else p + n
        if p is not None:
            running = p if running is None else running + p
        if running is not None:
            total = running if total is None else total + running
    return total


def windows_for(c: int, bits: int) -> int:
    """Windows of c bits that hold a scalar below 2^bits in signed digits. The offset
    below is just over 2^(c·w−1), so s + offset fits in c·w bits once s < 2^(c·w−2)."""
    return -(-(bits + 2) // c)


def digit_offset(c: int, windows: int) -> int:
    """2^(c−1) in every window: the unsigned c-bit digits of s + offset, each minus
    2^(c−1), are signed digits of s in [−2^(c−1), 2^(c−1))."""
    return sum(1 << (c * j + c - 1) for j in range(windows))


def _wnaf5(k: int) -> list[int]:
    """Width-5 NAF digits of k ≥ 0, least significant first: odd digits in [−15, 15]."""
    digits = []
    while k:
        if k & 1:
            d = k & 31
            if d > 16:
                d -= 32
            k -= d
            digits.append(d)
        else:
            digits.append(0)
        k >>= 1
    return digits


def _straus_cost(count: int, bits: int) -> float:
    # Shared doublings, one addition per ~6 bits per point, 8 odd multiples and their
    # negatives per point.
    return bits + count * (bits / 6 + 12)


def _pippenger_plan(count: int, bits: int) -> tuple[float, int]:
    """(additions, window) of the cheapest signed-digit Pippenger for this shape."""
    return min((windows_for(c, bits) * (count + 1.5 * (1 << c) + c), c) for c in range(2, 13))


def _straus(pairs: Sequence[tuple[G1Element, int]]) -> G1Element:
    """Σ sᵢ·Pᵢ by interleaved width-5 NAF: the doublings are shared by all points, so for
    a few points this needs far fewer additions than buckets would."""
    tables = []
    nafs = []
    for p, s in pairs:
        double = p + p
        odd = [p]  # odd[i] = (2i+1)·p
        for _ in range(7):
            odd.append(odd[-1] + double)
        tables.append((odd, [q.negate() for q in odd]))
        nafs.append(_wnaf5(s))
    rows = list(zip(tables, nafs, strict=True))
    acc = None
    for bit in range(max(len(d) for d in nafs) - 1, -1, -1):
        if acc is not None:
            acc = acc + acc
        for (odd, neg), digits in rows:
            if bit < len(digits):
                d = digits[bit]
                if d:
                    term = odd[(d - 1) >> 1] if d > 0 else neg[(-d - 1) >> 1]
                    acc = term if acc is None else acc + term
    return acc if acc is not None else G1Element()


def g1_lincomb(points: Sequence[G1Element], scalars: Sequence[int]) -> G1Element:
    """Return Σ scalars[i]·points[i]: interleaved wNAF for few points, else Pippenger with
    signed digits and per-window buckets, whichever the addition count favours."""
    pairs = []
    for p, s in zip(points, scalars, strict=True):
        s %= BLS_MODULUS
        if s == 0:
            continue
        if s > _HALF_MODULUS:
            p, s = p.negate(), BLS_MODULUS - s
        pairs.append((p, s))
    if not pairs:
        return G1Element()
    if len(pairs) == 1:
        return g1_mul(*pairs[0])
    bits = max(s.bit_length() for _, s in pairs)
    cost, c = _pippenger_plan(len(pairs), bits)
    if _straus_cost(len(pairs), bits) < cost:
        return _straus(pairs)
    half, mask = 1 << (c - 1), (1 << c) - 1
    windows = windows_for(c, bits)
    offset = digit_offset(c, windows)
    shifts = range(0, windows * c, c)
    digits = [[((s + offset) >> shift & mask) - half for shift in shifts] for _, s in pairs]
    result = None
    for w in range(windows - 1, -1, -1):
        if result is not None:
            for _ in range(c):
                result = result + result
        pos: list[G1Element | None] = [None] * (half + 1)
        neg: list[G1Element | None] = [None] * (half + 1)
        for (p, _), row in zip(pairs, digits, strict=True):
            d = row[w]
            if d > 0:
                b = pos[d]
                pos[d] = p if b is None else b + p
            elif d < 0:
                b = neg[-d]
                neg[-d] = p if b is None else b + p
        window_sum = _sum_buckets(pos, neg)
        if window_sum is not None:
            result = window_sum if result is None else result + window_sum
    return result if result is not None else G1Element()


class FixedBaseMSM:
    """Σ sᵢ·Pᵢ over fixed points Pᵢ, from a table of Pᵢ·2^(c·j) for every window j.

    Every digit of every window lands in one shared set of buckets, so a product costs
    about N·⌈bits/c⌉ bucket additions plus ~3·2^(c−1) to combine the buckets, and no
    doublings. Digits are signed (−2^(c−1) ≤ d < 2^(c−1)) by the offset trick: the plain
    base-2^c digits u of s + Σⱼ 2^(c−1)·2^(c·j) give d = u − 2^(c−1). A bucket is a list
    summed at the end by one C-level reduction, which keeps Python work per digit to a
    list append: blspy's addition costs ~2.6 µs whatever the operands, so the number of
    additions is the cost model.
    """

    def __init__(self, rows: list[list[G1Element]], c: int) -> None:
        self.c = c
        self.windows = len(rows)
        self.size = len(rows[0]) if rows else 0
        self.rows = rows  # rows[j][i] = 2^(c·j)·P_i
        self._columns = [list(col) for col in zip(*rows, strict=True)]

    @classmethod
    def build(
        cls, points: Sequence[G1Element], c: int, bits: int = 255, windows: int | None = None
    ) -> FixedBaseMSM:
        """Compute the table: each window is the previous one doubled c times. With
        ``windows`` below what ``bits`` need, scalars are handled in chunks."""
        rows = [list(points)]
        for _ in range((windows or windows_for(c, bits)) - 1):
            row = []
            for p in rows[-1]:
                for _ in range(c):
                    p = p + p
                row.append(p)
            rows.append(row)
        return cls(rows, c)

    def lincomb(self, scalars: Sequence[int]) -> G1Element:
        """Return Σ scalars[i]·P_i; scalars are canonical field elements."""
        if len(scalars) != self.size:
            raise ValueError(f"expected {self.size} scalars, got {len(scalars)}")
        c = self.c
        # A scalar above r/2 is negated so all stay below 2^254; its digits then go to
        # the mirrored buckets (index full − u holds digit −(u − half)).
        terms = []
        top = 0
        for i, s in enumerate(scalars):
            if s:
                if s > _HALF_MODULUS:
                    s = BLS_MODULUS - s
                    terms.append((i, s, True))
                else:
                    terms.append((i, s, False))
                if s > top:
                    top = s
        if not terms:
            return G1Element()
        windows = windows_for(c, top.bit_length())
        offset = digit_offset(c, windows)
        stored = self.windows
        # A table of fewer windows than the scalars need (a smaller file, a faster warm
        # load): Horner over chunks of `stored` windows, each with its own buckets.
        result = None
        for start in range(((windows - 1) // stored) * stored, -1, -stored):
            if result is not None:
                for _ in range(c * stored):
                    result = result + result
            shifts = range(start * c, min(start + stored, windows) * c, c)
            part = self._chunk_sum(terms, offset, shifts)
            if part is not None:
                result = part if result is None else result + part
        return result if result is not None else G1Element()

    def _chunk_sum(
        self, terms: list[tuple[int, int, bool]], offset: int, shifts: range
    ) -> G1Element | None:
        """Σ over the given windows of digit·(row point), the rows taken from the first."""
        c = self.c
        half, full, mask = 1 << (c - 1), 1 << c, (1 << c) - 1
        buckets: list[list[G1Element]] = [[] for _ in range(full + 1)]
        append = [b.append for b in buckets]
        mirrored = append[::-1]
        columns = self._columns
        for i, s, negated in terms:
            t = s + offset
            add_to = mirrored if negated else append
            for shift, point in zip(shifts, columns[i]):  # noqa: B905 (columns may be longer)
                add_to[t >> shift & mask](point)
        sums = [reduce(operator.add, b) if b else None for b in buckets]
        # Digit +k sits at index half + k, digit −k at half − k.
        return _sum_buckets(sums[half:], sums[half::-1])
