"""A second, independent verifier of the audit log's receipts, for the tests.

Written from the texts only (RFC 9162 sections 2.1.1, 2.1.3.2 and 2.1.4.2; c2sp.org/signed-note,
tlog-checkpoint and tlog-proof) and on purpose sharing nothing with the ``audit`` package: a
receipt the product issues is only trusted by the tests when this verifier accepts it too. The
Merkle functions follow the RFC pseudo-code step by step, keeping its variable names (fn, sn, r,
fr, sr). Every failure raises AssertionError with a message saying what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EM_DASH = "\u2014"
PROOF_FIRST_LINE = "c2sp.org/tlog-proof@v1"
DIGITS = "0123456789"


def fail(message: str) -> NoReturn:
    raise AssertionError(message)


def HASH(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def LSB(n: int) -> int:
    return n & 1


def from_base64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        fail(f"{what} is not base64: {text!r}")
    if base64.b64encode(data).decode() != text:
        fail(f"{what} is not canonical base64: {text!r}")
    return data


def from_decimal(text: str, what: str) -> int:
    ok = text == "0" or (text != "" and text[0] in "123456789" and all(c in DIGITS for c in text))
    if not ok:
        fail(f"{what} is not a decimal without leading zeroes: {text!r}")
    return int(text)


def check_key_name(name: str, where: str) -> None:
    if name == "":
        fail(f"{where}: empty key name")
    if "+" in name:
        fail(f"{where}: key name {name!r} contains '+'")
    for c in name:
        if c.isspace():
            fail(f"{where}: key name {name!r} contains a space")


# --- RFC 9162 ------------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))."""
    return HASH(b"\x00" + entry)


def tree_hash(entries: list[bytes]) -> bytes:
    """RFC 9162 2.1.1: MTH(D[n]), recursively, k the largest power of two smaller than n."""
    n = len(entries)
    if n == 0:
        return HASH(b"")
    if n == 1:
        return leaf_hash(entries[0])
    k = 1
    while k * 2 < n:
        k = k * 2
    return HASH(b"\x01" + tree_hash(entries[:k]) + tree_hash(entries[k:]))


def verify_inclusion(
    hash: bytes, leaf_index: int, tree_size: int, inclusion_path: list[bytes], root_hash: bytes
) -> bool:
    """RFC 9162 2.1.3.2, step by step."""
    # 1. leaf_index must be below tree_size.
    if leaf_index >= tree_size:
        return False
    # 2. and 3.
    fn = leaf_index
    sn = tree_size - 1
    r = hash
    # 4.
    for p in inclusion_path:
        # a.
        if sn == 0:
            return False
        # b.
        if LSB(fn) == 1 or fn == sn:
            r = HASH(b"\x01" + p + r)
            if LSB(fn) == 0:
                while not (LSB(fn) == 1 or fn == 0):
                    fn = fn >> 1
                    sn = sn >> 1
        else:
            r = HASH(b"\x01" + r + p)
        # c.
        fn = fn >> 1
        sn = sn >> 1
    # 5.
    return sn == 0 and r == root_hash


def verify_consistency(
    old: int, size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> bool:
    """RFC 9162 2.1.4.2, step by step (first = old, second = size).

    The RFC defines proofs for 0 < first < second; for first == second the proof is empty
    (SUBPROOF(m, D[m], true) = {}) and the roots must be equal.
    """
    first, second, first_hash, second_hash = old, size, old_root, new_root
    if first < 1 or first > second:
        return False
    if first == second:
        return proof == [] and first_hash == second_hash
    # 1.
    if len(proof) == 0:
        return False
    path = list(proof)
    # 2.
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    # 3.
    fn = first - 1
    sn = second - 1
    # 4.
    if LSB(fn) == 1:
        while LSB(fn) == 1:
            fn = fn >> 1
            sn = sn >> 1
    # 5.
    fr = path[0]
    sr = path[0]
    # 6.
    for c in path[1:]:
        # a.
        if sn == 0:
            return False
        # b.
        if LSB(fn) == 1 or fn == sn:
            fr = HASH(b"\x01" + c + fr)
            sr = HASH(b"\x01" + c + sr)
            if LSB(fn) == 0:
                while not (LSB(fn) == 1 or fn == 0):
                    fn = fn >> 1
                    sn = sn >> 1
        else:
            sr = HASH(b"\x01" + sr + c)
        # c.
        fn = fn >> 1
        sn = sn >> 1
    # 7.
    return fr == first_hash and sr == second_hash and sn == 0


# --- c2sp.org/signed-note and tlog-checkpoint ----------------------------------------------


def parse_vkey(vkey: str) -> tuple[str, bytes, bytes]:
    """<name>+hex(key ID)+base64(0x01 || Ed25519 public key) -> (name, key ID, public key)."""
    # base64 may itself contain '+', so only the first two are separators.
    pieces = vkey.split("+", 2)
    if len(pieces) != 3:
        fail(f"vkey {vkey!r} does not have three '+'-separated parts")
    name, id_hex, key_b64 = pieces
    check_key_name(name, "vkey")
    if len(id_hex) != 8 or any(c not in "0123456789abcdef" for c in id_hex):
        fail(f"vkey key ID {id_hex!r} is not 8 lowercase hex digits")
    key_data = from_base64(key_b64, "vkey key data")
    if len(key_data) != 33 or key_data[0] != 0x01:
        fail("vkey key data is not 0x01 followed by a 32-byte Ed25519 key")
    key_id = bytes.fromhex(id_hex)
    # key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte Ed25519 public key)[:4]
    if HASH(name.encode() + b"\x0a" + key_data)[:4] != key_id:
        fail(f"vkey key ID {id_hex} does not match its name and key")
    return name, key_id, key_data[1:]


def open_note(signed_note: str, vkeys: list[str]) -> str:
    """Return the text of a signed note after checking it against the vkeys."""
    try:
        signed_note.encode("utf-8")
    except UnicodeEncodeError:
        fail("note is not valid UTF-8")
    for c in signed_note:
        if ord(c) < 0x20 and c != "\n":
            fail(f"note contains control character {ord(c):#04x}")
    blank = signed_note.rfind("\n\n")
    if blank == -1:
        fail("note has no blank line before its signatures")
    text = signed_note[: blank + 1]
    signature_part = signed_note[blank + 2 :]
    if signature_part == "" or signature_part[-1] != "\n":
        fail("note's signature lines are missing or do not end in a newline")
    keys = {}
    for vkey in vkeys:
        name, key_id, public_key = parse_vkey(vkey)
        if keys.get((name, key_id), public_key) != public_key:
            fail(f"two vkeys share the name {name!r} and key ID {key_id.hex()}")
        keys[(name, key_id)] = public_key
    verified = 0
    for line in signature_part[:-1].split("\n"):
        if not line.startswith(EM_DASH + " "):
            fail(f"not a signature line: {line!r}")
        name, space, signature_b64 = line[2:].partition(" ")
        if space != " ":
            fail(f"signature line without a signature: {line!r}")
        check_key_name(name, "signature line")
        blob = from_base64(signature_b64, "signature")
        if len(blob) < 5:
            fail("signature shorter than key ID plus signature")
        public_key = keys.get((name, blob[:4]))
        if public_key is None:
            continue  # signed-note: verifiers MUST ignore signatures from unknown keys
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(blob[4:], text.encode())
        except InvalidSignature:
            fail(f"signature by known key {name}+{blob[:4].hex()} does not verify")
        verified = verified + 1
    if verified == 0:
        fail("note has no verified signature by any of the given keys")
    return text


def open_checkpoint(signed_note: str, vkeys: list[str]) -> tuple[str, int, bytes]:
    """Verify a signed checkpoint and return (origin, size, root)."""
    text = open_note(signed_note, vkeys)
    lines = text.split("\n")
    if lines[-1] != "":
        fail("checkpoint text does not end in a newline")
    lines = lines[:-1]
    if len(lines) < 3:
        fail("checkpoint has fewer than three lines")
    for line in lines:
        if line == "":
            fail("checkpoint has an empty line")
    origin = lines[0]
    size = from_decimal(lines[1], "checkpoint tree size")
    root = from_base64(lines[2], "checkpoint root hash")
    if len(root) != 32:
        fail("checkpoint root hash is not 32 bytes")
    return origin, size, root


# --- c2sp.org/tlog-proof ------------------------------------------------------------------


def verify_receipt(receipt: dict, vkeys: list[str], origin: str | None = None) -> dict:
    """Verify {"entry": <canonical JSON>, "proof": <tlog-proof@v1 text>} end to end."""
    if not isinstance(receipt.get("entry"), str) or not isinstance(receipt.get("proof"), str):
        fail("receipt must have string 'entry' and 'proof' fields")
    entry = receipt["entry"]
    proof_lines = receipt["proof"].split("\n")
    if proof_lines[0] != PROOF_FIRST_LINE:
        fail(f"proof does not start with {PROOF_FIRST_LINE}")
    at = 1
    if at < len(proof_lines) and proof_lines[at].startswith("extra "):
        if from_base64(proof_lines[at][6:], "proof extra data") == b"":
            fail("proof has an empty extra line")
        at = at + 1
    if at >= len(proof_lines) or not proof_lines[at].startswith("index "):
        fail("proof has no index line")
    index = from_decimal(proof_lines[at][6:], "proof index")
    at = at + 1
    inclusion_path = []
    while at < len(proof_lines) and proof_lines[at] != "":
        node = from_base64(proof_lines[at], "proof hash")
        if len(node) != 32:
            fail("proof hash is not 32 bytes")
        inclusion_path.append(node)
        at = at + 1
    if at >= len(proof_lines):
        fail("proof has no blank line before its checkpoint")
    checkpoint = "\n".join(proof_lines[at + 1 :])

    log_origin, size, root = open_checkpoint(checkpoint, vkeys)
    if origin is not None and log_origin != origin:
        fail(f"checkpoint origin {log_origin!r} is not the expected {origin!r}")
    if index >= size:
        fail(f"proof index {index} is not below the tree size {size}")
    if not verify_inclusion(leaf_hash(entry.encode()), index, size, inclusion_path, root):
        fail(f"entry is not included at index {index} in the tree of size {size}")
    try:
        parsed_entry = json.loads(entry)
    except ValueError:
        fail("the logged entry is not JSON")
    return {"index": index, "size": size, "root": root, "origin": log_origin, "entry": parsed_entry}
