"""C2SP signed notes, checkpoints and tlog proofs (audit.note, audit.tlog) and the tests'
independent reference verifier, against the Go-produced vectors and each other."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.merkle import root_from_leaves
from audit.note import (
    MAX_SIGNATURES,
    NoteError,
    NoteSigner,
    NoteVerifier,
    Signature,
    add_signature,
    key_hash,
    open_note,
    parse_note,
)
from audit.tlog import (
    Checkpoint,
    InclusionError,
    TlogProof,
    open_checkpoint,
    parse_checkpoint,
    parse_tlog_proof,
    verify_inclusion_proof,
)
from tests.audit import reference_tlog as ref

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "tlog-vectors" / "vectors.json"
ORIGIN = "example.org/test-log"
# The worked example in c2sp.org/signed-note ("Verifier keys", "Example").
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2"
    "ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


@pytest.fixture(scope="module")
def signer(vectors: dict[str, Any]) -> NoteSigner:
    return NoteSigner.from_skey(vectors["note"]["signer_key"])


@pytest.fixture(scope="module")
def verifier(vectors: dict[str, Any]) -> NoteVerifier:
    return NoteVerifier.from_vkey(vectors["note"]["verifier_key"])


@pytest.fixture(scope="module")
def signed(vectors: dict[str, Any]) -> str:
    return vectors["note"]["signed_checkpoint"]


@pytest.fixture(scope="module")
def proof_text(vectors: dict[str, Any]) -> str:
    return vectors["tlog_proof"]["proof"]


@pytest.fixture(scope="module")
def entry(vectors: dict[str, Any]) -> bytes:
    return vectors["entries"][vectors["tlog_proof"]["entry_index"]].encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def flip_base64_char(text: str, pos: int) -> str:
    return text[:pos] + ("A" if text[pos] != "A" else "B") + text[pos + 1 :]


# --- the vectors (golang.org/x/mod/sumdb/note and sumdb/tlog) ------------------------------


def test_vector_keys(vectors: dict[str, Any], signer: NoteSigner, verifier: NoteVerifier) -> None:
    note = vectors["note"]
    assert signer.name == verifier.name == note["name"]
    assert signer.vkey == verifier.vkey == note["verifier_key"]
    assert signer.skey == note["signer_key"]
    assert signer.public_key == verifier.public_key
    assert key_hash(note["name"], verifier.public_key) == verifier.key_hash
    assert ref.parse_vkey(note["verifier_key"]) == (
        verifier.name,
        verifier.key_hash,
        verifier.public_key,
    )


def test_vector_note_opens_and_is_reproduced(
    vectors: dict[str, Any], signer: NoteSigner, verifier: NoteVerifier, signed: str
) -> None:
    text, verified = open_note(signed, [verifier])
    assert verified == [verifier]
    assert signer.sign(text) == signed  # Ed25519 is deterministic
    checkpoint = open_checkpoint(signed, [verifier], ORIGIN)
    root = unb64(vectors["roots"]["300"])
    assert checkpoint == Checkpoint(ORIGIN, 300, root)
    assert checkpoint.text() == text
    assert signer.sign(checkpoint.text()) == signed
    assert ref.open_checkpoint(signed, [verifier.vkey]) == (ORIGIN, 300, root)


def test_spec_example_note() -> None:
    verifier = NoteVerifier.from_vkey(SPEC_VKEY)
    assert open_note(SPEC_NOTE, [verifier]) == ("This is an example message.\n", [verifier])
    assert ref.open_note(SPEC_NOTE, [SPEC_VKEY]) == "This is an example message.\n"


def test_vector_tlog_proof(
    vectors: dict[str, Any], verifier: NoteVerifier, signed: str, proof_text: str, entry: bytes
) -> None:
    index = vectors["tlog_proof"]["entry_index"]
    proof = parse_tlog_proof(proof_text)
    assert (proof.index, proof.checkpoint, proof.extra) == (index, signed, None)
    assert proof.text() == proof_text
    check = verify_inclusion_proof(entry, proof_text, [verifier], ORIGIN)
    assert check.index == index
    assert check.checkpoint == open_checkpoint(signed, [verifier])
    assert check.signers == (ORIGIN,)
    result = ref.verify_receipt(
        {"entry": entry.decode(), "proof": proof_text}, [verifier.vkey], ORIGIN
    )
    assert result == {
        "index": index,
        "size": 300,
        "root": unb64(vectors["roots"]["300"]),
        "origin": ORIGIN,
        "entry": json.loads(entry),
    }


def test_reference_merkle_on_vectors(vectors: dict[str, Any]) -> None:
    entries = [e.encode() for e in vectors["entries"]]
    roots = {int(size): unb64(root) for size, root in vectors["roots"].items()}
    for size, root in roots.items():
        assert ref.tree_hash(entries[:size]) == root
    for case in vectors["inclusion"]:
        index, size = case["index"], case["size"]
        path = [unb64(h) for h in case["hashes"]]
        leaf = ref.leaf_hash(entries[index])
        assert ref.verify_inclusion(leaf, index, size, path, roots[size])
        if path:
            assert not ref.verify_inclusion(leaf, index, size, path[:-1], roots[size])
        assert not ref.verify_inclusion(leaf, index, size, [*path, roots[size]], roots[size])
    tree_root = {size: ref.tree_hash(entries[:size]) for size in range(1, 301)}
    for case in vectors["consistency"]:
        old, size = case["old"], case["size"]
        path = [unb64(h) for h in case["hashes"]]
        assert ref.verify_consistency(old, size, tree_root[old], tree_root[size], path)
        assert not ref.verify_consistency(old, size, tree_root[old], tree_root[size], path[:-1])
        assert not ref.verify_consistency(old, size, tree_root[size], tree_root[size], path)
        tampered = [path[0][::-1], *path[1:]]
        assert not ref.verify_consistency(old, size, tree_root[old], tree_root[size], tampered)
    assert ref.verify_consistency(5, 5, tree_root[5], tree_root[5], [])
    assert not ref.verify_consistency(0, 5, ref.tree_hash([]), tree_root[5], [])


def test_product_proofs_verify_with_reference(
    vectors: dict[str, Any], signer: NoteSigner, verifier: NoteVerifier
) -> None:
    """Every vector inclusion proof, wrapped by audit.tlog, is accepted by both verifiers."""
    entries = [e.encode() for e in vectors["entries"]]
    notes: dict[int, str] = {}
    for case in vectors["inclusion"]:
        size, index = case["size"], case["index"]
        if size not in notes:
            root = root_from_leaves([ref.leaf_hash(e) for e in entries[:size]])
            notes[size] = signer.sign(Checkpoint(ORIGIN, size, root).text())
        hashes = tuple(unb64(h) for h in case["hashes"])
        text = TlogProof(index, hashes, notes[size]).text()
        assert verify_inclusion_proof(entries[index], text, [verifier], ORIGIN).index == index
        receipt = {"entry": entries[index].decode(), "proof": text}
        assert ref.verify_receipt(receipt, [verifier.vkey], ORIGIN)["index"] == index


# --- negative cases -----------------------------------------------------------------------


def test_altered_text(verifier: NoteVerifier, signed: str) -> None:
    with pytest.raises(NoteError, match="does not verify"):
        open_note(signed.replace("\n300\n", "\n301\n"), [verifier])
    with pytest.raises(AssertionError, match="does not verify"):
        ref.open_checkpoint(signed.replace("\n300\n", "\n301\n"), [verifier.vkey])


def test_altered_signature(verifier: NoteVerifier, signed: str) -> None:
    pos = signed.rindex(" ") + 20  # inside the signature, past the key ID
    with pytest.raises(NoteError, match="does not verify"):
        open_note(flip_base64_char(signed, pos), [verifier])
    with pytest.raises(AssertionError, match="does not verify"):
        ref.open_note(flip_base64_char(signed, pos), [verifier.vkey])


def test_wrong_key_same_name(signed: str) -> None:
    other = NoteSigner.generate(ORIGIN).verifier()
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_note(signed, [other])
    with pytest.raises(AssertionError, match="no verified signature"):
        ref.open_checkpoint(signed, [other.vkey])


def test_key_id_mismatch(vectors: dict[str, Any], verifier: NoteVerifier, signed: str) -> None:
    vkey = vectors["note"]["verifier_key"]
    bad = vkey.replace("+4b5177e6+", "+4b5177e7+")
    with pytest.raises(NoteError, match="key ID does not match"):
        NoteVerifier.from_vkey(bad)
    with pytest.raises(AssertionError, match="does not match"):
        ref.parse_vkey(bad)
    skey = vectors["note"]["signer_key"].replace("+4b5177e6+", "+4b5177e7+")
    with pytest.raises(NoteError, match="key ID does not match"):
        NoteSigner.from_skey(skey)
    # A signature line claiming another key ID is some other key's: ignored, so none verify.
    name, sig = signed.rsplit(" ", 1)
    raw = unb64(sig)
    renamed = f"{name} {b64(bytes(1) + raw[1:])}\n"
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_note(renamed, [verifier])


@pytest.mark.parametrize(
    "vkey",
    [
        "example.com/foo+530d903a",  # two parts
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k+x",
        "example.com/foo+530D903A+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # upper hex
        "example.com/foo+530d903+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # short ID
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2",  # bad base64
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U0=",  # short key
        "example.com/foo+530d903a+AukyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # type 0x02
        "+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # empty name
        "example com+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",  # space in name
    ],
)
def test_bad_vkeys(vkey: str) -> None:
    with pytest.raises(NoteError):
        NoteVerifier.from_vkey(vkey)
    with pytest.raises(AssertionError):
        ref.parse_vkey(vkey)


def test_truncated_proof(verifier: NoteVerifier, proof_text: str, entry: bytes) -> None:
    lines = proof_text.split("\n")
    del lines[2]  # the first hash, the leaf's sibling
    truncated = "\n".join(lines)
    with pytest.raises(InclusionError, match="does not lead to the root"):
        verify_inclusion_proof(entry, truncated, [verifier])
    with pytest.raises(AssertionError, match="not included"):
        ref.verify_receipt({"entry": entry.decode(), "proof": truncated}, [verifier.vkey])


@pytest.mark.parametrize("index", [136, 138, 0, 299])
def test_wrong_index(verifier: NoteVerifier, proof_text: str, entry: bytes, index: int) -> None:
    text = proof_text.replace("\nindex 137\n", f"\nindex {index}\n")
    with pytest.raises(InclusionError):
        verify_inclusion_proof(entry, text, [verifier])
    with pytest.raises(AssertionError):
        ref.verify_receipt({"entry": entry.decode(), "proof": text}, [verifier.vkey])


def test_index_beyond_size(verifier: NoteVerifier, proof_text: str, entry: bytes) -> None:
    text = proof_text.replace("\nindex 137\n", "\nindex 300\n")
    with pytest.raises(InclusionError, match="not below the tree size"):
        verify_inclusion_proof(entry, text, [verifier])


def test_altered_entry(
    vectors: dict[str, Any], verifier: NoteVerifier, proof_text: str, entry: bytes
) -> None:
    for other in (entry + b" ", entry.replace(b"138", b"139"), vectors["entries"][136].encode()):
        with pytest.raises(InclusionError):
            verify_inclusion_proof(other, proof_text, [verifier])
        with pytest.raises(AssertionError):
            ref.verify_receipt({"entry": other.decode(), "proof": proof_text}, [verifier.vkey])


def test_missing_blank_line(
    verifier: NoteVerifier, signed: str, proof_text: str, entry: bytes
) -> None:
    with pytest.raises(NoteError, match="no blank line"):
        open_note(signed.replace("\n\n", "\n"), [verifier])
    hashes_only = proof_text.split("\n\n")[0] + "\n"
    with pytest.raises(NoteError, match="no blank line"):
        parse_tlog_proof(hashes_only)
    for proof in (
        proof_text.replace("=\n\nexample", "=\nexample", 1),  # none before the checkpoint
        proof_text.replace("=\n\n\u2014", "=\n\u2014", 1),  # none inside the checkpoint
    ):
        with pytest.raises(NoteError):
            verify_inclusion_proof(entry, proof, [verifier])
        with pytest.raises(AssertionError):
            ref.verify_receipt({"entry": entry.decode(), "proof": proof}, [verifier.vkey])


def test_bad_base64(
    signer: NoteSigner, verifier: NoteVerifier, signed: str, proof_text: str
) -> None:
    text = parse_note(signed).text
    root = text.split("\n")[2]
    for bad_root in (root[:-1], root.replace("K", "!", 1), root[:-2] + "J=", " " + root):
        resigned = signer.sign(text.replace(root, bad_root))  # validly signed, bad root
        with pytest.raises(NoteError, match="checkpoint root"):
            open_checkpoint(resigned, [verifier])
        with pytest.raises(AssertionError, match="root hash"):
            ref.open_checkpoint(resigned, [verifier.vkey])
    sig = signed.rsplit(" ", 1)[1][:-1]
    for bad_sig in (sig[:-1], sig.replace("S", "-", 1), sig[:-2] + "h=", sig + "=="):
        with pytest.raises(NoteError, match="signature line"):
            parse_note(signed.replace(sig, bad_sig))
        with pytest.raises(AssertionError, match="base64"):
            ref.open_note(signed.replace(sig, bad_sig), [verifier.vkey])
    first_hash = proof_text.split("\n")[2]
    for bad_hash in (first_hash[:-1], first_hash[:-2] + "B=", first_hash[:-4]):
        with pytest.raises(NoteError, match="proof hash"):
            parse_tlog_proof(proof_text.replace(first_hash, bad_hash))


def test_bad_checkpoint_texts() -> None:
    root = b64(bytes(32))
    good = f"o\n5\n{root}\n"
    assert parse_checkpoint(good) == Checkpoint("o", 5, bytes(32))
    assert parse_checkpoint(f"o\n0\n{root}\next a\next b\n").extensions == ("ext a", "ext b")
    for bad in [
        f"o\n5\n{root}",  # no final newline
        f"\n5\n{root}\n",  # empty origin
        f"o\n05\n{root}\n",  # leading zero
        f"o\n+5\n{root}\n",
        f"o\n-1\n{root}\n",
        "o\n\u0665\n" + root + "\n",  # Arabic-Indic digit five
        f"o\n5 \n{root}\n",
        f"o\n9223372036854775808\n{root}\n",  # 2**63
        f"o\n5\n{b64(bytes(31))}\n",
        f"o\n5\n{root}\n\n",  # empty extension line
        f"o\n5\n{root}\next\n\n",
        "o\n5\n",
    ]:
        with pytest.raises(NoteError):
            parse_checkpoint(bad)


def test_trailing_data(verifier: NoteVerifier, signed: str, proof_text: str, entry: bytes) -> None:
    for note in (signed + "x", signed + "\n", signed[:-1], signed + "trailing\n"):
        with pytest.raises(NoteError):
            open_note(note, [verifier])
    for proof in (proof_text + "\n", proof_text + "x", proof_text[:-1]):
        with pytest.raises(NoteError):
            verify_inclusion_proof(entry, proof, [verifier])
        with pytest.raises(AssertionError):
            ref.verify_receipt({"entry": entry.decode(), "proof": proof}, [verifier.vkey])


def test_malformed_proof_headers(proof_text: str) -> None:
    body = proof_text.split("\n", 2)[2]
    for head in [
        "c2sp.org/tlog-proof@v2\nindex 137\n",
        "c2sp.org/tlog-proof@v1\nindex 0137\n",
        "c2sp.org/tlog-proof@v1\nindex  137\n",
        "c2sp.org/tlog-proof@v1\nindex 137 \n",
        "c2sp.org/tlog-proof@v1\nindex\n",
        "c2sp.org/tlog-proof@v1\nextra \nindex 137\n",  # empty extra must be omitted
        "c2sp.org/tlog-proof@v1\nextra AA\nindex 137\n",
        "c2sp.org/tlog-proof@v1\nindex 137\nextra AA==\n",  # extra after index
        "c2sp.org/tlog-proof@v1\r\nindex 137\n",
        "c2sp.org/tlog-proof@v1\n",
        "",
    ]:
        with pytest.raises(NoteError):
            parse_tlog_proof(head + body)


def test_origin_mismatch(
    verifier: NoteVerifier, signed: str, proof_text: str, entry: bytes
) -> None:
    with pytest.raises(NoteError, match="origin"):
        open_checkpoint(signed, [verifier], "example.org/other-log")
    with pytest.raises(NoteError, match="origin"):
        verify_inclusion_proof(entry, proof_text, [verifier], "example.org/test-log/")
    with pytest.raises(AssertionError, match="origin"):
        ref.verify_receipt(
            {"entry": entry.decode(), "proof": proof_text}, [verifier.vkey], "example.org/other"
        )


def test_known_bad_signature_among_good(signer: NoteSigner, verifier: NoteVerifier) -> None:
    witness = NoteSigner.generate("witness.example/w1")
    text = Checkpoint(ORIGIN, 1, bytes(32)).text()
    good = add_signature(signer.sign(text), witness.signature_line(text))
    assert open_note(good, [verifier, witness.verifier()])[1] == [verifier, witness.verifier()]
    # The witness signed another text: its line is well-formed but does not verify.
    wrong = witness.signature_line(text.replace("\n1\n", "\n2\n"))
    for note in (add_signature(signer.sign(text), wrong), wrong_first(signer, text, wrong)):
        with pytest.raises(NoteError, match="does not verify"):
            open_note(note, [verifier, witness.verifier()])
        with pytest.raises(AssertionError, match="does not verify"):
            ref.open_note(note, [verifier.vkey, witness.vkey])
        # Without the witness's key its line is just an unknown signature.
        assert open_note(note, [verifier])[1] == [verifier]


def wrong_first(signer: NoteSigner, text: str, wrong: str) -> str:
    return text + "\n" + wrong + signer.signature_line(text)


def test_unknown_signatures_alone() -> None:
    text = Checkpoint(ORIGIN, 7, bytes(32)).text()
    note = NoteSigner.generate("a.example").sign(text)
    note = add_signature(note, NoteSigner.generate("b.example").signature_line(text))
    known = NoteSigner.generate("c.example").verifier()
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_note(note, [known])
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_note(note, [])
    with pytest.raises(AssertionError, match="no verified signature"):
        ref.open_note(note, [known.vkey])


def test_cosignatures(verifier: NoteVerifier, signed: str, proof_text: str, entry: bytes) -> None:
    text = parse_note(signed).text
    witness = NoteSigner.generate("witness.example/w1")
    # An Ed25519 cosignature (c2sp.org/tlog-cosignature, type 0x04) from an unknown witness:
    # a key ID, then an 8-byte timestamp and a 64-byte signature.
    cosig = Signature("witness2.example", bytes.fromhex("8e1f8a3c"), bytes(8) + bytes(64))
    note = add_signature(signed, cosig.line())
    note = add_signature(note, witness.signature_line(text))
    assert parse_note(note).signatures[1] == cosig
    assert open_note(note, [verifier]) == (text, [verifier])
    assert open_note(note, [witness.verifier(), verifier]) == (text, [verifier, witness.verifier()])
    assert open_note(note, [witness.verifier()]) == (text, [witness.verifier()])
    assert ref.open_checkpoint(note, [verifier.vkey])[1] == 300
    assert ref.open_checkpoint(note, [witness.vkey])[1] == 300
    # Inside a proof, the cosigned checkpoint reports both signers.
    proof = parse_tlog_proof(proof_text)
    cosigned = TlogProof(proof.index, proof.hashes, note).text()
    check = verify_inclusion_proof(entry, cosigned, [verifier, witness.verifier()], ORIGIN)
    assert check.signers == (ORIGIN, "witness.example/w1")
    receipt = {"entry": entry.decode(), "proof": cosigned}
    assert ref.verify_receipt(receipt, [verifier.vkey, witness.vkey], ORIGIN)["size"] == 300
    # The same key may not sign twice; a line must be one newline-terminated signature line.
    with pytest.raises(NoteError, match="already signed"):
        add_signature(note, witness.signature_line(text))
    for bad in ("", "— w AAAAAAA=", "— w AAAAAAA=\n— x AAAAAAA=\n", "- w AAAAAAA=\n"):
        with pytest.raises(NoteError):
            add_signature(signed, bad)


# --- note syntax and keys -------------------------------------------------------------------


def test_note_text_may_hold_blank_lines() -> None:
    """The text ends at the last blank line, so texts with empty lines (even a final one, or a
    line that looks like a signature) round-trip."""
    signer = NoteSigner.generate("example.com/n")
    verifier = signer.verifier()
    for text in ("a\n\nb\n", "a\n\n", "\n", "a\n\n— x AAAAAAA=\n", "ünï €\n"):
        note = signer.sign(text)
        assert parse_note(note).text == text
        assert open_note(note, [verifier]) == (text, [verifier])
        assert ref.open_note(note, [signer.vkey]) == text


@pytest.mark.parametrize(
    "note",
    [
        "",
        "\n",
        "text\n\n",  # no signature lines
        "text\n\n\n",
        "text\n\n— k AAAAAAA=",  # no final newline
        "text\n\n— k AAAAAAA=\n\n",
        "text\n\n—k AAAAAAA=\n",
        "text\n\n-- k AAAAAAA=\n",
        "text\n\n— k  AAAAAAA=\n",
        "text\n\n— k AAAAAAA= \n",
        "text\n\n—  AAAAAAA=\n",  # empty name
        "text\n\n— k+1 AAAAAAA=\n",
        "text\n\n— k\u00a0x AAAAAAA=\n",  # no-break space in the name
        "text\n\n— k\u2028x AAAAAAA=\n",
        "text\n\n— k AAAAAA==\n",  # 4 bytes: a key ID and no signature
        "text\n\n— k\n",
        "te\txt\n\n— k AAAAAAA=\n",  # control characters
        "text\r\n\n— k AAAAAAA=\n",
        "text\n\n— k AAAAAAA=\r\n",
        "te\x00xt\n\n— k AAAAAAA=\n",
        "te\ud800xt\n\n— k AAAAAAA=\n",  # not encodable as UTF-8
    ],
)
def test_malformed_notes(note: str) -> None:
    with pytest.raises(NoteError):
        parse_note(note)


def test_signature_count_limit() -> None:
    """The spec: verifiers MUST accept at least 16 signatures and SHOULD cap the number."""
    signer = NoteSigner.generate("log.example")
    text = "limit\n"
    lines = [NoteSigner.generate(f"w{i}.example").signature_line(text) for i in range(3)]
    filler = lines[0]
    note = signer.sign(text) + filler * (MAX_SIGNATURES - 1)
    assert MAX_SIGNATURES >= 16
    assert len(parse_note(note).signatures) == MAX_SIGNATURES
    assert open_note(note, [signer.verifier()])[1] == [signer.verifier()]
    with pytest.raises(NoteError, match="more than"):
        parse_note(note + filler)
    with pytest.raises(NoteError, match="more than"):
        add_signature(note, lines[1])


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\nb", "a\u3000b", "a\x7fb\x01"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(NoteError, match="key name"):
        NoteSigner(name, bytes(32))
    with pytest.raises(NoteError, match="key name"):
        NoteVerifier(name, bytes(32))


def test_sign_refuses_bad_texts() -> None:
    signer = NoteSigner.generate("example.com/s")
    for text in ("", "no newline", "tab\there\n", "cr\r\n", "\ud800\n"):
        with pytest.raises(NoteError, match="note text"):
            signer.sign(text)


def test_signer_keys_round_trip() -> None:
    signer = NoteSigner.generate("example.com/ünïcode")
    again = NoteSigner.from_skey(signer.skey)
    assert (again.name, again.key_hash, again.public_key) == (
        signer.name,
        signer.key_hash,
        signer.public_key,
    )
    assert NoteVerifier.from_vkey(signer.vkey) == signer.verifier()
    assert ref.parse_vkey(signer.vkey) == (signer.name, signer.key_hash, signer.public_key)
    assert "PRIVATE" not in repr(signer) and signer.skey.split("+", 4)[-1] not in repr(signer)
    assert signer.sign("x\n") == again.sign("x\n")
    for bad in (signer.skey[len("PRIVATE+KEY+") :], signer.skey[:-4], signer.vkey):
        with pytest.raises(NoteError):
            NoteSigner.from_skey(bad)
    with pytest.raises(NoteError, match="seed"):
        NoteSigner("example.com/s", bytes(31))


def test_ambiguous_verifiers(verifier: NoteVerifier, signed: str) -> None:
    assert open_note(signed, [verifier, verifier])[1] == [verifier]
    clash = NoteVerifier(verifier.name, bytes(32))
    object.__setattr__(clash, "key_hash", verifier.key_hash)  # forge a colliding key ID
    with pytest.raises(NoteError, match="share the name"):
        open_note(signed, [verifier, clash])


def test_checkpoint_and_proof_construction() -> None:
    for args in [
        ("", 1, bytes(32)),
        ("a\nb", 1, bytes(32)),
        ("o", -1, bytes(32)),
        ("o", 2**63, bytes(32)),
        ("o", True, bytes(32)),
        ("o", 1, bytes(31)),
        ("o", 1, bytes(32), ("",)),
        ("o", 1, bytes(32), ("a\nb",)),
    ]:
        with pytest.raises(NoteError):
            Checkpoint(*args)
    note = NoteSigner.generate("o").sign(Checkpoint("o", 2, bytes(32)).text())
    assert TlogProof(1, [bytes(32)], note).hashes == (bytes(32),)
    for kwargs in [
        {"index": -1},
        {"hashes": (bytes(31),)},
        {"hashes": (bytes(32),) * 64},
        {"checkpoint": "o\n2\n\n— o AAAAAAA=\n"},
        {"checkpoint": Checkpoint("o", 2, bytes(32)).text()},
        {"extra": b""},
    ]:
        with pytest.raises(NoteError):
            TlogProof(**{"index": 1, "hashes": (), "checkpoint": note, **kwargs})


# --- round trips --------------------------------------------------------------------------

ORIGINS = st.text(
    st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), min_size=1, max_size=40
)
SIZES = st.integers(min_value=0, max_value=2**63 - 1)
HASHES = st.binary(min_size=32, max_size=32)
ROUND_TRIP_SIGNER = NoteSigner(ORIGIN, bytes(range(32)))


@settings(max_examples=40, deadline=None)
@given(
    origin=ORIGINS,
    size=SIZES,
    root=HASHES,
    extensions=st.lists(ORIGINS, max_size=2).map(tuple),
)
def test_checkpoint_round_trip(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    checkpoint = Checkpoint(origin, size, root, extensions)
    assert parse_checkpoint(checkpoint.text()) == checkpoint
    note = ROUND_TRIP_SIGNER.sign(checkpoint.text())
    verifier = ROUND_TRIP_SIGNER.verifier()
    assert open_checkpoint(note, [verifier], origin) == checkpoint
    assert ref.open_checkpoint(note, [verifier.vkey]) == (origin, size, root)


@settings(max_examples=40, deadline=None)
@given(
    origin=ORIGINS,
    size=st.integers(min_value=1, max_value=2**63 - 1),
    data=st.data(),
    root=HASHES,
    hashes=st.lists(HASHES, max_size=63).map(tuple),
    extra=st.none() | st.binary(min_size=1, max_size=64),
)
def test_tlog_proof_round_trip(
    origin: str,
    size: int,
    data: st.DataObject,
    root: bytes,
    hashes: tuple[bytes, ...],
    extra: bytes | None,
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    note = ROUND_TRIP_SIGNER.sign(Checkpoint(origin, size, root).text())
    proof = TlogProof(index, hashes, note, extra)
    assert parse_tlog_proof(proof.text()) == proof


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.text(max_size=8), min_size=1, max_size=40), data=st.data())
def test_small_trees_both_verifiers(values: list[str], data: st.DataObject) -> None:
    """A proof computed by hand from the RFC definition verifies in audit.tlog and the
    reference, and the same proof for another entry fails in both."""
    entries = [json.dumps({"seq": i, "v": v}).encode() for i, v in enumerate(values)]
    size = len(entries)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    note = ROUND_TRIP_SIGNER.sign(Checkpoint(ORIGIN, size, ref.tree_hash(entries)).text())
    text = TlogProof(index, tuple(rfc_path(index, entries)), note).text()
    verifier = ROUND_TRIP_SIGNER.verifier()
    assert verify_inclusion_proof(entries[index], text, [verifier]).checkpoint.size == size
    receipt = {"entry": entries[index].decode(), "proof": text}
    assert ref.verify_receipt(receipt, [verifier.vkey])["entry"] == json.loads(entries[index])
    other = json.dumps({"seq": index, "v": values[index] + "x"})
    with pytest.raises(InclusionError):
        verify_inclusion_proof(other.encode(), text, [verifier])
    with pytest.raises(AssertionError, match="not included"):
        ref.verify_receipt({"entry": other, "proof": text}, [verifier.vkey])


def rfc_path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(m, D[n])."""
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*rfc_path(m, d[:k]), ref.tree_hash(d[k:])]
    return [*rfc_path(m - k, d[k:]), ref.tree_hash(d[:k])]
