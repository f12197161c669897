"""RFC 9162 Merkle tree: the shared vectors, the RFC's own recursive definitions, pymerkle as an
independent implementation, and batch proofs built from a compact range alone."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import InmemoryTree, InvalidProof
from pymerkle import verify_consistency as pymerkle_verify_consistency
from pymerkle import verify_inclusion as pymerkle_verify_inclusion

from audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    BatchTree,
    CompactRange,
    Node,
    consistency_nodes,
    fold,
    inclusion_nodes,
    leaf_hash,
    node_hash,
    perfect_nodes,
    proof_from_nodes,
    root_from_inclusion,
    root_from_leaves,
    root_nodes,
    verify_consistency,
    verify_inclusion,
)
from tests.conftest import missing

# Beside the repository (../shared), like the KZG spec vectors in tests/conftest.py.
VECTORS = Path(__file__).resolve().parents[3] / "shared" / "tlog-vectors" / "vectors.json"

FAST = settings(max_examples=60, deadline=None, database=None)

# Sizes where the tree shape changes: powers of two and their neighbours.
EDGES = sorted({0, 1, 2, 3} | {p + d for p in (4, 8, 16, 32, 64, 128) for d in (-1, 0, 1)})


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def hashes_of(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct leaf hashes (distinct, so a proof for one leaf cannot pass for another)."""
    return [leaf_hash(f"{seed}:{i}".encode()) for i in range(count)]


def flip(value: bytes, at: int = 0) -> bytes:
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1 :]


class Reference:
    """RFC 9162 section 2.1 as written: recursive MTH, PATH and SUBPROOF over leaf hashes."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.leaves = list(leaves)
        self.mth = cache(self._mth)

    def _mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return self.leaves[lo]
        k = largest_power_below(n)
        return hashlib.sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi)).digest()

    def node(self, node: Node) -> bytes:
        level, index = node
        return self.mth(index << level, (index + 1) << level)

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        if hi - lo == 1:
            return []
        k = largest_power_below(hi - lo)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        if m == hi - lo:
            return [] if b else [self.mth(lo, hi)]
        k = largest_power_below(hi - lo)
        if m <= k:
            return [*self.subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self.subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]


def largest_power_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


# -- the shared vectors ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    if not VECTORS.is_file():
        missing(f"transparency-log vectors at {VECTORS}")
    return json.loads(VECTORS.read_text())


@pytest.fixture(scope="module")
def vector_tree(vectors: dict[str, Any]) -> Reference:
    return Reference([leaf_hash(entry.encode("utf-8")) for entry in vectors["entries"]])


def test_vector_roots_from_leaves_and_appends(
    vectors: dict[str, Any], vector_tree: Reference
) -> None:
    leaves = vector_tree.leaves
    roots = {int(size): b64(root) for size, root in vectors["roots"].items()}
    assert len(leaves) == 300
    assert len(roots) == 19
    for size, root in roots.items():
        assert root_from_leaves(leaves[:size]) == root, size
    edge = CompactRange()
    seen = 0
    for leaf in leaves:
        edge.append(leaf)
        if edge.size in roots:
            assert edge.root() == roots[edge.size], edge.size
            again = CompactRange.from_bytes(edge.size, edge.to_bytes())
            assert again.root() == roots[edge.size]
            seen += 1
    assert seen == len(roots)


def test_vector_inclusion_proofs(vectors: dict[str, Any], vector_tree: Reference) -> None:
    leaves = vector_tree.leaves
    assert len(vectors["inclusion"]) == 54
    for item in vectors["inclusion"]:
        index, size = item["index"], item["size"]
        expected = [b64(h) for h in item["hashes"]]
        proof = proof_from_nodes(inclusion_nodes(index, size), vector_tree.node)
        assert proof == expected, item
        root = root_from_leaves(leaves[:size])
        assert root_from_inclusion(leaves[index], index, size, expected) == root
        assert verify_inclusion(leaves[index], index, size, expected, root), item
        for bad in inclusion_mutations(leaves, index, size, expected, root):
            assert not verify_inclusion(*bad), (item, bad[1:3])


def inclusion_mutations(
    leaves: Sequence[bytes], index: int, size: int, proof: list[bytes], root: bytes
) -> list[tuple[bytes, int, int, list[bytes], bytes]]:
    """Every way to spoil a good proof that must make it fail. A wrong size comes with the true
    root of that size: a checkpoint signs the pair, so the pair is what a proof is checked
    against."""
    out = [
        (flip(leaves[index]), index, size, proof, root),
        (leaves[index], index, size, proof, flip(root)),
    ]
    for at, digest in enumerate(proof):
        out.append(
            (
                leaves[index],
                index,
                size,
                [*proof[:at], flip(digest, at % HASH_SIZE), *proof[at + 1 :]],
                root,
            )
        )
    if proof:
        out.append((leaves[index], index, size, proof[:-1], root))
        out.append((leaves[index], index, size, proof[1:], root))
    out.append((leaves[index], index, size, [*proof, leaf_hash(b"extra")], root))
    out.append((leaves[index], index, size, [*proof, proof[-1] if proof else root], root))
    for other in (index - 1, index + 1, size):
        if 0 <= other <= size:
            out.append((leaves[index], other, size, proof, root))
    for other in (size - 1, size + 1, 2 * size):
        if index < other <= len(leaves):
            out.append((leaves[index], index, other, proof, root_from_leaves(leaves[:other])))
    out.append((leaves[index], index, size, proof, root[:-1]))
    return out


def test_vector_consistency_proofs(vectors: dict[str, Any], vector_tree: Reference) -> None:
    leaves = vector_tree.leaves
    assert len(vectors["consistency"]) == 72
    for item in vectors["consistency"]:
        old, size = item["old"], item["size"]
        expected = [b64(h) for h in item["hashes"]]
        proof = proof_from_nodes(consistency_nodes(old, size), vector_tree.node)
        assert proof == expected, item
        old_root, new_root = root_from_leaves(leaves[:old]), root_from_leaves(leaves[:size])
        assert verify_consistency(old, size, old_root, new_root, expected), item
        assert old < size
        for bad in consistency_mutations(leaves, old, size, expected, old_root, new_root):
            assert not verify_consistency(*bad), (item, bad[:2])


def consistency_mutations(
    leaves: Sequence[bytes],
    old: int,
    size: int,
    proof: list[bytes],
    old_root: bytes,
    new_root: bytes,
) -> list[tuple[int, int, bytes, bytes, list[bytes]]]:
    """As ``inclusion_mutations``: wrong sizes come with the true roots of those sizes."""

    def root(n: int) -> bytes:
        return root_from_leaves(leaves[:n])

    out = [
        (old, size, flip(old_root), new_root, proof),
        (old, size, old_root, flip(new_root), proof),
        (old, size, new_root, old_root, proof),
        (old, size, old_root, new_root, proof[:-1]),
        (old, size, old_root, new_root, proof[1:]),
        (old, size, old_root, new_root, [*proof, leaf_hash(b"extra")]),
        (old, size, old_root, new_root, [old_root, *proof]),
        (old, size, old_root, new_root, [*proof, proof[-1]]),
        (old, size, old_root, new_root, []),
    ]
    for at, digest in enumerate(proof):
        out.append(
            (old, size, old_root, new_root, [*proof[:at], flip(digest, at), *proof[at + 1 :]])
        )
    for other in (old - 1, old + 1):
        if 0 < other <= size:
            out.append((other, size, root(other), new_root, proof))
    for other in (size - 1, size + 1):
        if old <= other <= len(leaves):
            out.append((old, other, old_root, root(other), proof))
    return out


def test_vector_tlog_proof_hashes(vectors: dict[str, Any], vector_tree: Reference) -> None:
    """The c2sp tlog-proof for entry 137 at size 300 carries our inclusion proof, hash for hash."""
    lines = vectors["tlog_proof"]["proof"].split("\n")
    assert lines[0] == "c2sp.org/tlog-proof@v1"
    assert lines[1] == f"index {vectors['tlog_proof']['entry_index']}" == "index 137"
    carried = [b64(line) for line in lines[2 : lines.index("")]]
    ours = proof_from_nodes(inclusion_nodes(137, 300), vector_tree.node)
    assert carried == ours
    assert root_from_leaves(vector_tree.leaves) == b64(vectors["roots"]["300"])


# -- primitives and plans ------------------------------------------------------------------------


def test_hashes_are_rfc_9162() -> None:
    assert HASH_SIZE == 32
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert node_hash(a, b) != node_hash(b, a)
    assert root_from_leaves([]) == EMPTY_ROOT == fold([]) == CompactRange().root()
    assert root_from_leaves([a]) == a == fold([a])
    c = leaf_hash(b"c")
    assert fold([a, b, c]) == node_hash(a, node_hash(b, c))


def test_root_nodes_are_the_binary_decomposition() -> None:
    assert root_nodes(0) == []
    assert root_nodes(1) == [(0, 0)]
    assert root_nodes(6) == [(2, 0), (1, 2)]
    assert root_nodes(13) == [(3, 0), (2, 2), (0, 12)]
    for size in range(300):
        nodes = root_nodes(size)
        assert [level for level, _ in nodes] == [b for b in range(9, -1, -1) if size >> b & 1]
        assert covered(nodes, 0) == size


def covered(nodes: list[Node], lo: int) -> int:
    """Check ``nodes`` tile a range from ``lo`` left to right, aligned, strictly shrinking;
    return where the range ends."""
    pos, last = lo, None
    for level, index in nodes:
        assert index << level == pos
        assert last is None or level < last
        pos, last = (index + 1) << level, level
    return pos


@FAST
@given(st.integers(0, 40), st.integers(0, 10**6), st.data())
def test_perfect_nodes_tile_aligned_ranges(power: int, block: int, data: st.DataObject) -> None:
    lo = block << power
    hi = lo + data.draw(st.integers(0, 1 << power))
    nodes = perfect_nodes(lo, hi)
    assert covered(nodes, lo) == hi
    assert len(nodes) == (hi - lo).bit_count()


@pytest.mark.parametrize(("lo", "hi"), [(-1, 3), (5, 4), (0, -1), (1, 3), (6, 9), (4, 9), (12, 17)])
def test_perfect_nodes_refuses_other_ranges(lo: int, hi: int) -> None:
    with pytest.raises(ValueError):
        perfect_nodes(lo, hi)


def test_plans_refuse_impossible_requests() -> None:
    for index, size in [(-1, 3), (3, 3), (0, 0), (7, 2)]:
        with pytest.raises(ValueError):
            inclusion_nodes(index, size)
    for old, size in [(0, 5), (0, 0), (6, 5), (-1, 5)]:
        with pytest.raises(ValueError):
            consistency_nodes(old, size)
    assert consistency_nodes(5, 5) == []
    assert inclusion_nodes(0, 1) == []
    assert consistency_nodes(2, 3) == [[(0, 2)]]
    assert inclusion_nodes(5, 7) == [[(0, 4)], [(0, 6)], [(2, 0)]]


def test_every_small_tree_matches_the_rfc_definitions() -> None:
    """Exhaustive over sizes 1..48: roots, every PATH and every PROOF as the RFC recursion
    computes them; every proof verifies."""
    ref = Reference(hashes_of(48))
    for size in range(1, 49):
        leaves = ref.leaves[:size]
        root = ref.mth(0, size)
        assert root_from_leaves(leaves) == root
        assert fold([ref.node(n) for n in root_nodes(size)]) == root
        for index in range(size):
            proof = proof_from_nodes(inclusion_nodes(index, size), ref.node)
            assert proof == ref.path(index, 0, size), (index, size)
            assert verify_inclusion(leaves[index], index, size, proof, root)
        for old in range(1, size + 1):
            proof = proof_from_nodes(consistency_nodes(old, size), ref.node)
            assert proof == ref.subproof(old, 0, size, True), (old, size)
            assert verify_consistency(old, size, ref.mth(0, old), root, proof)


@FAST
@given(st.integers(1, 2000), st.data())
def test_random_proofs_verify_and_spoiled_ones_fail(size: int, data: st.DataObject) -> None:
    ref = Reference(hashes_of(size + 2, seed=size))
    root = ref.mth(0, size)
    index = data.draw(st.integers(0, size - 1))
    proof = proof_from_nodes(inclusion_nodes(index, size), ref.node)
    assert proof == ref.path(index, 0, size)
    assert verify_inclusion(ref.leaves[index], index, size, proof, root)
    for bad in inclusion_mutations(ref.leaves, index, size, proof, root):
        assert not verify_inclusion(*bad)
    old = data.draw(st.integers(1, size))
    proof = proof_from_nodes(consistency_nodes(old, size), ref.node)
    assert proof == ref.subproof(old, 0, size, True)
    old_root = ref.mth(0, old)
    assert verify_consistency(old, size, old_root, root, proof)
    if old < size:
        for bad in consistency_mutations(ref.leaves, old, size, proof, old_root, root):
            assert not verify_consistency(*bad)


def test_root_from_inclusion_refuses_misshapen_proofs() -> None:
    leaves = hashes_of(5)
    good = proof_from_nodes(inclusion_nodes(2, 5), Reference(leaves).node)
    for index, size, proof in [
        (2, 5, good[:-1]),
        (2, 5, [*good, good[0]]),
        (5, 5, good),
        (-1, 5, good),
        (2, 5, [good[0][:31], *good[1:]]),
    ]:
        with pytest.raises(ValueError):
            root_from_inclusion(leaves[2], index, size, proof)
    with pytest.raises(ValueError):
        root_from_inclusion(leaves[2][:16], 2, 5, good)
    assert root_from_inclusion(leaves[2], 2, 5, good) == root_from_leaves(leaves)


def test_the_claimed_size_must_fit_the_proof() -> None:
    """The RFC walk ties the proof length to the claimed sizes (its final ``sn == 0``), but a root
    is only bound to its size by the checkpoint that signs both: a size-3 proof with the size-3
    root also passes for a claimed size 4, a pair no honest checkpoint carries."""
    ref = Reference(hashes_of(5))
    to_four = proof_from_nodes(consistency_nodes(2, 4), ref.node)
    assert verify_consistency(2, 4, ref.mth(0, 2), ref.mth(0, 4), to_four)
    assert not verify_consistency(2, 5, ref.mth(0, 2), ref.mth(0, 4), to_four)
    path = proof_from_nodes(inclusion_nodes(0, 3), ref.node)
    assert verify_inclusion(ref.leaves[0], 0, 3, path, ref.mth(0, 3))
    assert verify_inclusion(ref.leaves[0], 0, 4, path, ref.mth(0, 3))
    assert not verify_inclusion(ref.leaves[0], 0, 4, path, ref.mth(0, 4))
    assert not verify_inclusion(ref.leaves[0], 0, 5, path, ref.mth(0, 3))


def test_consistency_edge_sizes() -> None:
    """Sizes the RFC algorithm leaves out: equal sizes need equal roots and no proof; the empty
    tree is extended by every tree, but only under its own root, SHA-256()."""
    a, b = root_from_leaves(hashes_of(3)), root_from_leaves(hashes_of(4))
    assert verify_consistency(3, 3, a, a, [])
    assert not verify_consistency(3, 3, a, b, [])
    assert not verify_consistency(3, 3, a, a, [a])
    assert verify_consistency(0, 4, EMPTY_ROOT, b, [])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(0, 4, a, b, [])
    assert not verify_consistency(0, 4, EMPTY_ROOT, b, [b])
    assert not verify_consistency(4, 3, b, a, [])
    assert not verify_consistency(-1, 3, EMPTY_ROOT, a, [])


garbage = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
    st.text(max_size=3),
    st.none(),
    st.integers(),
    st.lists(st.binary(min_size=32, max_size=32), max_size=3),
)
sizes = st.one_of(st.integers(-3, 70), st.integers(), st.none(), st.floats())


@FAST
@given(garbage, sizes, sizes, st.one_of(garbage, st.lists(garbage, max_size=8)), garbage)
def test_verify_inclusion_never_raises(
    leaf: Any, index: Any, size: Any, proof: Any, root: Any
) -> None:
    result = verify_inclusion(leaf, index, size, proof, root)
    # Only a one-leaf tree whose root is the leaf itself holds without a real proof.
    assert result is False or (proof == [] and size == 1 and leaf == root)


@FAST
@given(sizes, sizes, garbage, garbage, st.one_of(garbage, st.lists(garbage, max_size=8)))
def test_verify_consistency_never_raises(
    old: Any, size: Any, old_root: Any, new_root: Any, proof: Any
) -> None:
    result = verify_consistency(old, size, old_root, new_root, proof)
    # Only the empty-tree and equal-size cases can hold without a real proof.
    assert result is False or (proof == [] and (old == size or old_root == EMPTY_ROOT))


# -- pymerkle, an independent implementation -----------------------------------------------------

PYMERKLE_SIZE = 1100  # past 1024, so trees of 11 levels appear


@pytest.fixture(scope="module")
def pymerkle_tree() -> tuple[InmemoryTree, list[bytes], list[bytes]]:
    """pymerkle's defaults are RFC 9162: sha256, 0x00/0x01 prefixes (``disable_security`` off),
    entries hashed as given. Built one append at a time, checking the root after each."""
    rng = random.Random(9162)
    entries = [rng.randbytes(rng.randrange(0, 64)) for _ in range(PYMERKLE_SIZE)]
    tree = InmemoryTree(algorithm="sha256", disable_security=False)
    assert (tree.algorithm, tree.security, tree.leaf_prefix, tree.node_prefix) == (
        "sha256",
        True,
        b"\x00",
        b"\x01",
    )
    edge = CompactRange()
    roots = [EMPTY_ROOT]
    for entry in entries:
        tree.append_entry(entry)
        edge.append(leaf_hash(entry))
        roots.append(edge.root())
        assert tree.get_root() == roots[-1], edge.size
    return tree, [leaf_hash(e) for e in entries], roots


def test_pymerkle_leaves_and_roots_agree(
    pymerkle_tree: tuple[InmemoryTree, list[bytes], list[bytes]],
) -> None:
    tree, leaves, roots = pymerkle_tree
    assert [tree.get_leaf(i + 1) for i in range(len(leaves))] == leaves
    assert tree.get_root(0) == EMPTY_ROOT
    for size in [*range(1, 301), *random.Random(1).sample(range(301, PYMERKLE_SIZE + 1), 60)]:
        assert tree.get_root(size) == root_from_leaves(leaves[:size]) == roots[size], size


@FAST
@given(st.integers(1, PYMERKLE_SIZE), st.data())
def test_pymerkle_inclusion_paths_are_ours(
    pymerkle_tree: tuple[InmemoryTree, list[bytes], list[bytes]], size: int, data: st.DataObject
) -> None:
    """pymerkle's path is the leaf hash followed by the RFC path, in the RFC's order."""
    tree, leaves, roots = pymerkle_tree
    index = data.draw(st.integers(0, size - 1))
    theirs = tree.prove_inclusion(index + 1, size)
    ours = proof_from_nodes(inclusion_nodes(index, size), Reference(leaves[:size]).node)
    assert theirs.path == [leaves[index], *ours]
    pymerkle_verify_inclusion(leaves[index], roots[size], theirs, index=index + 1, size=size)
    assert verify_inclusion(leaves[index], index, size, ours, roots[size])
    with pytest.raises(InvalidProof):
        pymerkle_verify_inclusion(leaves[index], flip(roots[size]), theirs)


@FAST
@given(st.integers(1, PYMERKLE_SIZE), st.data())
def test_pymerkle_consistency_agrees(
    pymerkle_tree: tuple[InmemoryTree, list[bytes], list[bytes]], size: int, data: st.DataObject
) -> None:
    """pymerkle lays consistency paths out its own way (not the RFC's list), so the hashes are
    not compared one by one: its proof must hold between our roots, and ours as well."""
    tree, leaves, roots = pymerkle_tree
    old = data.draw(st.integers(1, size))
    theirs = tree.prove_consistency(old, size)
    pymerkle_verify_consistency(roots[old], roots[size], theirs, prior_size=old, later_size=size)
    with pytest.raises(InvalidProof):
        pymerkle_verify_consistency(flip(roots[old]), roots[size], theirs)
    ours = proof_from_nodes(consistency_nodes(old, size), Reference(leaves[:size]).node)
    assert verify_consistency(old, size, roots[old], roots[size], ours)


# -- CompactRange --------------------------------------------------------------------------------


def test_compact_range_append_reports_completed_nodes() -> None:
    ref = Reference(hashes_of(300))
    edge = CompactRange()
    stored: dict[Node, bytes] = {}
    for index, leaf in enumerate(ref.leaves):
        created = edge.append(leaf)
        expected = [(lvl, index >> lvl) for lvl in range(10) if (index + 1) % (1 << lvl) == 0]
        assert [node for node, _ in created] == expected
        assert created[0] == ((0, index), leaf)
        for node, digest in created:
            assert digest == ref.node(node)
        stored.update(created)
        assert edge.size == index + 1
        assert edge.nodes() == root_nodes(edge.size)
        assert edge.hashes == [ref.node(n) for n in edge.nodes()]
        assert edge.root() == ref.mth(0, edge.size)
    # The nodes appends reported are every perfect node of the tree: a store needs nothing else.
    assert len(stored) == sum(300 >> level for level in range(9))
    for level, index in stored:
        assert (index + 1) << level <= 300


def test_compact_range_serialisation_and_copies() -> None:
    edge = CompactRange()
    for leaf in hashes_of(23):
        edge.append(leaf)
    data = edge.to_bytes()
    assert len(data) == 4 * HASH_SIZE  # 23 = 0b10111
    again = CompactRange.from_bytes(23, data)
    assert again == edge and again.root() == edge.root()
    assert CompactRange(23, edge.hashes) == edge
    twin = edge.copy()
    twin.append(leaf_hash(b"more"))
    assert edge.size == 23 and edge == again and twin.size == 24
    assert CompactRange.from_bytes(0, b"") == CompactRange()


@pytest.mark.parametrize(
    "build",
    [
        lambda: CompactRange(-1),
        lambda: CompactRange(3, [EMPTY_ROOT]),
        lambda: CompactRange(1, [EMPTY_ROOT[:31]]),
        lambda: CompactRange(0, [EMPTY_ROOT]),
        lambda: CompactRange.from_bytes(3, EMPTY_ROOT),
        lambda: CompactRange.from_bytes(1, EMPTY_ROOT + b"\x00"),
        lambda: CompactRange().append(b"short"),
    ],
)
def test_compact_range_refuses_malformed_input(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


# -- BatchTree -----------------------------------------------------------------------------------


def edge_of(leaves: Sequence[bytes]) -> CompactRange:
    edge = CompactRange()
    for leaf in leaves:
        edge.append(leaf)
    return edge


@settings(max_examples=80, deadline=None, database=None)
@given(st.one_of(st.sampled_from(EDGES), st.integers(0, 200)), st.sampled_from(EDGES[:-3]))
def test_batch_proofs_match_the_full_tree(old: int, batch: int) -> None:
    ref = Reference(hashes_of(old + batch, seed=old * 1000 + batch))
    before = edge_of(ref.leaves[:old])
    tree = BatchTree(before, ref.leaves[old:])
    size = old + batch
    assert tree.size == size
    root = ref.mth(0, size)
    assert tree.root() == root
    assert tree.after == edge_of(ref.leaves)
    assert before.size == old  # untouched
    for index in range(old, size):
        proof = tree.inclusion_proof(index)
        assert proof == ref.path(index, 0, size), (old, batch, index)
        assert verify_inclusion(ref.leaves[index], index, size, proof, root)
    for node in before.nodes():
        assert tree.node(node) == ref.node(node)
    for bad in (old - 1, size):
        with pytest.raises(ValueError):
            tree.inclusion_proof(bad)
    with pytest.raises(ValueError):
        tree.node((0, size))
    with pytest.raises(ValueError):
        tree.node((size.bit_length(), 0))
    if old >= 2:  # a leaf of the old range is not kept
        with pytest.raises(KeyError):
            tree.node((0, 0))
    if 0 < old < size:  # the old and new tree heads are provably consistent from the batch alone
        proof = proof_from_nodes(consistency_nodes(old, size), tree.node)
        assert proof == ref.subproof(old, 0, size, True)
        assert verify_consistency(old, size, before.root(), root, proof)


class LazyDerivation:
    """The batch derivation stated plainly, recursive and memoised: a node is one of ``before``'s,
    a new leaf, or the hash of its two children. BatchTree must agree with it."""

    def __init__(self, before: CompactRange, leaves: Sequence[bytes]) -> None:
        self.known: dict[Node, bytes] = dict(zip(before.nodes(), before.hashes, strict=True))
        self.known.update(((0, before.size + i), leaf) for i, leaf in enumerate(leaves))
        self.old = before.size
        self.hashed = 0

    def node(self, node: Node) -> bytes:
        if node in self.known:
            return self.known[node]
        level, index = node
        assert level > 0 and (index + 1) << level > self.old, node
        self.hashed += 1
        digest = node_hash(self.node((level - 1, 2 * index)), self.node((level - 1, 2 * index + 1)))
        self.known[node] = digest
        return digest


@FAST
@given(
    st.one_of(
        st.sampled_from([10_000_000, 2**23, 2**23 - 1, 2**24, 2**24 + 1]), st.integers(1, 2**40)
    ),
    st.sampled_from([1, 2, 3, 255, 256, 257]),
    st.randoms(use_true_random=False),
)
def test_batch_at_large_sizes(old: int, batch: int, rng: random.Random) -> None:
    """A compact range of random hashes stands for a huge log nobody could store here."""
    before = CompactRange(old, [rng.randbytes(32) for _ in range(old.bit_count())])
    leaves = [rng.randbytes(32) for _ in range(batch)]
    tree = BatchTree(before, leaves)
    lazy = LazyDerivation(before, leaves)
    size = old + batch
    root = fold([lazy.node(n) for n in root_nodes(size)])
    assert tree.root() == root
    for index in rng.sample(range(old, size), min(batch, 20)):
        proof = tree.inclusion_proof(index)
        assert proof == proof_from_nodes(inclusion_nodes(index, size), lazy.node)
        assert verify_inclusion(leaves[index - old], index, size, proof, root)
    proof = proof_from_nodes(consistency_nodes(old, size), tree.node)
    assert verify_consistency(old, size, before.root(), root, proof)
    # Deriving every proof costs about one hash per new leaf plus one per level.
    for index in range(old, size):
        proof_from_nodes(inclusion_nodes(index, size), lazy.node)
    assert lazy.hashed <= batch + size.bit_length()
