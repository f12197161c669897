"""RFC 9162 section 2.1 Merkle tree hashing and proofs, for the audit transparency log.

Leaf hash ``SHA-256(0x00 || entry)``, node hash ``SHA-256(0x01 || left || right)``, empty tree
``SHA-256()``. The distinct prefixes keep a leaf from ever being read as an inner node.

The RFC tree over ``n`` leaves is the right fold of its maximal perfect subtrees (the binary
decomposition of ``n``, largest first). Perfect subtrees never change once complete, so they are
the unit of storage: a ``Node`` ``(level, index)`` names the one over leaves
``[index * 2**level, (index + 1) * 2**level)``. Every proof element is the fold of a few such
nodes, which is why proofs are first planned as node groups (``*_nodes``) and only then hashed
(``proof_from_nodes``) from whatever store holds the nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "BatchTree",
    "CompactRange",
    "Node",
    "consistency_nodes",
    "fold",
    "inclusion_nodes",
    "leaf_hash",
    "node_hash",
    "perfect_nodes",
    "proof_from_nodes",
    "root_from_inclusion",
    "root_from_leaves",
    "root_nodes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
_sha256 = hashlib.sha256
EMPTY_ROOT: bytes = _sha256(b"").digest()

Node = tuple[int, int]
"""``(level, index)``: the perfect subtree over leaves ``[index << level, (index + 1) << level)``."""


def leaf_hash(entry: bytes) -> bytes:
    """Return the RFC 9162 leaf hash of ``entry`` (the 0x00 prefix separates leaves from nodes)."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 hash of an inner node from its children's hashes."""
    return _sha256(b"\x01" + left + right).digest()


def perfect_nodes(lo: int, hi: int) -> list[Node]:
    """Return the maximal aligned perfect subtrees covering ``[lo, hi)``, left to right.

    Every range an RFC 9162 proof hashes starts at 0 or at a multiple of a power of two at
    least as wide as the range, so its decomposition is the binary one of ``hi - lo`` and each
    piece is a stored node. Other ranges are refused: their pieces would not be the RFC's.
    """
    if lo < 0 or hi < lo:
        raise ValueError(f"bad leaf range [{lo}, {hi})")
    width = hi - lo
    if lo and (lo & -lo) < width:
        raise ValueError(f"leaf range [{lo}, {hi}) is not aligned to its width")
    out: list[Node] = []
    pos = lo
    level = width.bit_length() - 1
    while level >= 0:
        if width >> level & 1:
            out.append((level, pos >> level))
            pos += 1 << level
        level -= 1
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """Return the hash of a range from the hashes of its ``perfect_nodes``, in order.

    The RFC splits at the largest power of two, so the range hash nests to the right:
    ``node_hash(h0, node_hash(h1, ... hk))``. An empty range hashes to ``EMPTY_ROOT``.
    """
    n = len(hashes)
    if not n:
        return EMPTY_ROOT
    sha = _sha256
    h = hashes[n - 1]
    for i in range(n - 2, -1, -1):
        h = sha(b"\x01" + hashes[i] + h).digest()
    return h


def root_nodes(size: int) -> list[Node]:
    """Return the nodes whose fold is the root of a tree of ``size`` leaves."""
    return perfect_nodes(0, size)


def inclusion_nodes(index: int, size: int) -> list[list[Node]]:
    """Plan RFC 9162 2.1.3.1 ``PATH(index, D[size])``: one node group per proof element.

    Elements come leaf level first, as the RFC lists them: the siblings inside the perfect
    subtree holding the leaf, then the fold of the smaller subtrees to its right (if any),
    then each larger subtree to its left, nearest first.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside a tree of size {size}")
    left: list[Node] = []
    start = 0
    level = size.bit_length() - 1
    while True:
        if size >> level & 1:
            width = 1 << level
            if index < start + width:
                break
            left.append((level, start >> level))
            start += width
        level -= 1
    groups: list[list[Node]] = [[(lvl, (index >> lvl) ^ 1)] for lvl in range(level)]
    end = start + width
    if end < size:
        groups.append(perfect_nodes(end, size))
    groups.extend([node] for node in reversed(left))
    return groups


def consistency_nodes(old: int, size: int) -> list[list[Node]]:
    """Plan RFC 9162 2.1.4.1 ``PROOF(old, D[size])``: one node group per proof element.

    Follows ``SUBPROOF`` with its ``b`` flag; ``old == size`` gives the empty proof. The RFC
    defines no proof from the empty tree, so ``old`` must satisfy ``0 < old <= size``.
    """
    if not 0 < old <= size:
        raise ValueError(f"no consistency proof from size {old} to size {size}")
    groups: list[list[Node]] = []
    if old == size:
        return groups
    start, end, m, known = 0, size, old, True
    while m != end - start:
        # k: the largest power of two below the range width (the width is at least 2 here).
        level = (end - start - 1).bit_length() - 1
        k = 1 << level
        if m <= k:
            groups.append(perfect_nodes(start + k, end))
            end = start + k
        else:
            groups.append([(level, start >> level)])
            start += k
            m -= k
            known = False
    if not known:
        groups.append(perfect_nodes(start, end))
    groups.reverse()
    return groups


def proof_from_nodes(
    groups: Sequence[Sequence[Node]], lookup: Callable[[Node], bytes]
) -> list[bytes]:
    """Hash a planned proof: each group folded from the node hashes ``lookup`` returns."""
    return [fold([lookup(node) for node in group]) for group in groups]


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the RFC 9162 tree hash over ``leaf_hashes``, level by level.

    Carrying an odd last node up unchanged gives the RFC's split at the largest power of two.
    """
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    sha = _sha256
    while len(level) > 1:
        nxt = [sha(b"\x01" + a + b).digest() for a, b in zip(level[::2], level[1::2], strict=False)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """Return the root that ``proof`` makes of leaf hash ``leaf`` at ``index`` in ``size`` leaves.

    The RFC 9162 2.1.3.2 bit walk, whose ``sn`` counts the proof elements the shape needs:
    a proof that is too long or too short, or a hash that is not 32 bytes, raises ValueError.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside a tree of size {size}")
    if not _is_hash(leaf):
        raise ValueError("the leaf hash must be 32 bytes")
    sha = _sha256
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ValueError("inclusion proof too long")
        if not _is_hash(p):
            raise ValueError("inclusion proof hashes must be 32 bytes")
        if fn & 1 or fn == sn:
            r = sha(b"\x01" + p + r).digest()
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = sha(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion proof too short")
    return r


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Return whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree ``(size, root)``.

    Take ``size`` and ``root`` from one signed checkpoint: the RFC walk binds the proof to the
    size, not the root to the size. Never raises: anything malformed is simply not a proof.
    """
    if not (isinstance(index, int) and isinstance(size, int) and _is_hash(root)):
        return False
    try:
        return root_from_inclusion(leaf, index, size, proof) == root
    except (TypeError, ValueError):
        return False


def verify_consistency(
    old: int, size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Return whether ``proof`` shows the tree ``(size, new_root)`` extends ``(old, old_root)``.

    RFC 9162 2.1.4.2 for ``0 < old < size``. Its algorithm is only defined there, so:
    ``old == size`` holds with an empty proof and equal roots; ``old == 0`` holds with an
    empty proof when ``old_root`` is the empty tree's hash, since every tree extends the empty
    one. Never raises: anything malformed is simply not a proof.
    """
    if not (isinstance(old, int) and isinstance(size, int) and 0 <= old <= size):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    try:
        path = list(proof)
    except TypeError:
        return False
    if not all(_is_hash(c) for c in path):
        return False
    if old == size:
        return not path and old_root == new_root
    if old == 0:
        return not path and old_root == EMPTY_ROOT
    if not path:
        return False
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    sha = _sha256
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = sha(b"\x01" + c + fr).digest()
            sr = sha(b"\x01" + c + sr).digest()
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = sha(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class CompactRange:
    """The right edge of a tree of ``size`` leaves: the hashes of ``root_nodes(size)``, so
    appends and the root need no stored tree."""

    __slots__ = ("hashes", "size")

    size: int
    hashes: list[bytes]

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad tree size {size!r}")
        hashes = list(hashes)
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {size.bit_count()} edge hashes")
        if not all(_is_hash(h) for h in hashes):
            raise ValueError("edge hashes must be 32 bytes")
        self.size = size
        self.hashes = hashes

    @classmethod
    def _trusted(cls, size: int, hashes: list[bytes]) -> CompactRange:
        new = cls.__new__(cls)
        new.size = size
        new.hashes = hashes
        return new

    def __repr__(self) -> str:
        return f"CompactRange(size={self.size}, root={self.root().hex()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self.size == other.size and self.hashes == other.hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def nodes(self) -> list[Node]:
        """Return the nodes ``hashes`` belong to, largest first."""
        return perfect_nodes(0, self.size)

    def append(self, leaf: bytes) -> list[tuple[Node, bytes]]:
        """Add one leaf hash; return every perfect node it completes, leaf first, so the caller
        can store them (a node never changes once complete)."""
        if not _is_hash(leaf):
            raise ValueError("a leaf hash must be 32 bytes")
        index = self.size
        hashes = self.hashes
        created = [((0, index), leaf)]
        h = leaf
        level = 0
        sha = _sha256
        while index & 1:
            index >>= 1
            level += 1
            h = sha(b"\x01" + hashes.pop() + h).digest()
            created.append(((level, index), h))
        hashes.append(h)
        self.size += 1
        return created

    def root(self) -> bytes:
        """Return the tree hash: the right fold of the edge."""
        return fold(self.hashes)

    def copy(self) -> CompactRange:
        """Return an independent copy (appends to it leave this one unchanged)."""
        return CompactRange._trusted(self.size, list(self.hashes))

    def to_bytes(self) -> bytes:
        """Return the edge hashes concatenated; the size is stored beside them."""
        return b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> CompactRange:
        """Rebuild the range ``to_bytes`` wrote for a tree of ``size`` leaves."""
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad tree size {size!r}")
        data = bytes(data)
        count = size.bit_count()
        if len(data) != count * HASH_SIZE:
            raise ValueError(f"a tree of size {size} has {count * HASH_SIZE} edge bytes")
        hashes = [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
        return cls._trusted(size, hashes)


class BatchTree:
    """Proofs for leaves appended in one batch, from the CompactRange before the batch and the
    batch's leaf hashes, with no database: any perfect node is either a node of the old compact
    range, a new leaf, or the hash of its two children (memoised).

    Every node that is not entirely old ends at a new leaf, so appending the batch to a copy of
    ``before`` completes each of them exactly once: the memo is built that way, in about two
    hashes per leaf. A node entirely old that a new leaf's proof needs is a left sibling whose
    parent holds the old size's boundary, which is one of ``before``'s nodes.
    """

    __slots__ = ("_folds", "_memo", "after", "old_size", "size")

    def __init__(self, before: CompactRange, leaves: Sequence[bytes]) -> None:
        after = before.copy()
        memo: dict[Node, bytes] = dict(zip(before.nodes(), before.hashes, strict=True))
        append = after.append
        update = memo.update
        for leaf in leaves:
            update(append(leaf))
        self.old_size: int = before.size
        self.size: int = after.size
        self.after: CompactRange = after
        self._memo = memo
        self._folds: dict[tuple[Node, ...], bytes] = {}

    def node(self, node: Node) -> bytes:
        """Return a node's hash; ValueError if it is not a complete node of this tree, KeyError
        if it lies entirely in the old range without being one of ``before``'s nodes."""
        try:
            return self._memo[node]
        except KeyError:
            pass
        level, index = node
        if level < 0 or index < 0 or (index + 1) << level > self.size:
            raise ValueError(f"node {node} is not a complete node of a tree of size {self.size}")
        raise KeyError(node)

    def inclusion_proof(self, index: int) -> list[bytes]:
        """Return the RFC 9162 inclusion proof of new leaf ``index`` at tree size ``size``."""
        if not self.old_size <= index < self.size:
            raise ValueError(f"leaf {index} is not in the batch [{self.old_size}, {self.size})")
        memo = self._memo
        proof = []
        for group in inclusion_nodes(index, self.size):
            if len(group) == 1:
                proof.append(memo[group[0]])
                continue
            key = tuple(group)
            h = self._folds.get(key)
            if h is None:
                h = self._folds[key] = fold([memo[node] for node in group])
            proof.append(h)
        return proof

    def root(self) -> bytes:
        """Return the tree hash after the batch."""
        return self.after.root()
