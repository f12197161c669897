"""``kzg-gateway audit verify|export|verify-receipt``: works without the server running.

``verify`` exits 0 when the log verifies and 1 when it does not, naming the first bad
sequence number, or when no signature at all was checked (nothing proves who wrote the
log); 2 when the source cannot be read. It says whether the log keys were
pinned (``--key``) or read from the source itself, which proves much less.
``verify-receipt`` checks a saved receipt (or a whole KZG answer) offline, against
pinned keys only: 0 valid, 1 invalid, 2 unreadable.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit.chain import canonical_json
from audit.export import export_lines
from audit.note import NoteError, NoteVerifier
from audit.retention import RetentionPolicy
from audit.signing import bls_signature_valid, key_bytes
from audit.tlog import PROOF_HEADER, parse_tlog_proof, verify_inclusion_proof
from audit.verify import VerifyReport, verify_database, verify_export_lines
from gateway.config import load_config
from gateway.db import DEFAULT_DATABASE_FILE, async_url

EXIT_VALID, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2
DATABASE_URL_ENV = "KZG_GATEWAY_DATABASE_URL"
LEGACY_RECEIPT_SCHEME = "bls12381-aug"


class SourceError(ValueError):
    """An argument or input that cannot be used: exit 2 with its message."""


def register(subparsers: Any) -> None:
    """Add the ``audit`` command group to the top-level CLI."""
    audit = subparsers.add_parser("audit", help="verify or export the audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser(
        "verify", help="verify the Merkle tree, its signed checkpoints and anchors"
    )
    _add_source(verify, allow_export=True)
    verify.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="VKEY",
        help="pin a log verifier key, <name>+<key id>+<key data> as GET /v1/log/keys lists "
        "it (repeatable); replaces the keys the source carries",
    )
    verify.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="a signed checkpoint note held from earlier (GET /v1/log/checkpoint) that the "
        "log must extend; with a database, proved by a consistency proof instead of a walk",
    )
    verify.add_argument(
        "--sample",
        type=int,
        metavar="K",
        help="instead of walking every entry, prove K random entries by inclusion proofs "
        "(database only)",
    )
    verify.add_argument(
        "--keep-years",
        type=int,
        metavar="N",
        help="the retention policy: refuse anchors that pruned records younger than N years",
    )
    _add_receipt_keys(verify, "pin the BLS keys of the first release's checkpoints")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")
    verify.set_defaults(func=run_verify)

    export = commands.add_parser("export", help="write the JSON Lines export")
    _add_source(export, allow_export=False)
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")
    export.set_defaults(func=run_export)

    receipt = commands.add_parser(
        "verify-receipt", help="verify a saved receipt or KZG answer offline"
    )
    receipt.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help='a receipt {"entry", "proof"}, a whole KZG answer with its "receipt", or a '
        ".tlog-proof file whose extra line carries the entry (as the Python SDK saves it)",
    )
    receipt.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="VKEY",
        help="a log verifier key to check the receipt's checkpoint with (repeatable)",
    )
    _add_receipt_keys(receipt, "BLS keys for a receipt of the first release")
    receipt.set_defaults(func=run_verify_receipt)


def _add_source(parser: argparse.ArgumentParser, allow_export: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    if allow_export:
        source.add_argument("--export", type=Path, metavar="FILE", help="a JSON Lines export")
    source.add_argument("--db-url", metavar="URL", help="database URL (SQLite or PostgreSQL)")
    source.add_argument("--data-dir", type=Path, metavar="D", help="the gateway's data directory")


def _add_receipt_keys(parser: argparse.ArgumentParser, purpose: str) -> None:
    parser.add_argument(
        "--receipt-key",
        action="append",
        default=[],
        metavar="KEY_ID=HEX",
        help=f"{purpose}: one BLS receipt public key (repeatable)",
    )
    parser.add_argument(
        "--receipt-keys",
        type=Path,
        metavar="FILE",
        help=f"{purpose}: the JSON answer of GET /v1/keys/receipts",
    )


def data_dir_database_url(data_dir: Path) -> str:
    """Return the database URL a gateway with this data directory uses, read as ``serve``
    reads it (``$KZG_GATEWAY_CONFIG`` or ``<data dir>/config.toml``, then the
    environment); the embedded SQLite file ``<data dir>/gateway.db`` must exist."""
    url = load_config(None, data_dir).database_url
    database = data_dir / DEFAULT_DATABASE_FILE
    if url.endswith(f":///{database.resolve()}") and not database.is_file():
        raise ValueError(f"no gateway database in {data_dir} (expected {database})")
    return url


def _database_url(args: argparse.Namespace) -> str:
    if args.db_url:
        return async_url(args.db_url)
    return data_dir_database_url(args.data_dir)


def _log_keys(vkeys: list[str]) -> list[str] | None:
    """The pinned log keys, checked now so a mistyped key is named as such."""
    if not vkeys:
        return None
    for vkey in vkeys:
        try:
            NoteVerifier.from_vkey(vkey)
        except NoteError as exc:
            raise SourceError(
                f"--key {vkey!r} is not a log verifier key ({exc}); pin the first release's "
                "BLS keys with --receipt-key KEY_ID=HEX"
            ) from None
    return vkeys


def _receipt_keys(args: argparse.Namespace) -> dict[str, bytes] | None:
    """BLS receipt keys from --receipt-key pairs and a --receipt-keys file, if any given."""
    if not args.receipt_key and args.receipt_keys is None:
        return None
    keys: dict[str, bytes] = {}
    if args.receipt_keys is not None:
        listed = json.loads(args.receipt_keys.read_text(encoding="utf-8"))
        entries = listed.get("keys") if isinstance(listed, dict) else listed
        if not isinstance(entries, list):
            raise SourceError(f"{args.receipt_keys}: expected the answer of GET /v1/keys/receipts")
        for entry in entries:
            keys[str(entry["key_id"])] = key_bytes(entry["public_key"])
    for pair in args.receipt_key:
        key_id, sep, value = pair.partition("=")
        if not sep:
            raise SourceError(f"--receipt-key expects KEY_ID=HEX, got {pair!r}")
        keys[key_id] = key_bytes(value)
    return keys


def _held_checkpoint(path: Path | None) -> str | None:
    if path is None:
        return None
    held = path.read_text(encoding="utf-8")
    if held.lstrip().startswith("{"):
        raise SourceError(
            f"{path} is a JSON checkpoint of the first release's hash chain: the log is a "
            "Merkle tree now; hold a signed checkpoint note (GET /v1/log/checkpoint) instead"
        )
    return held


async def _with_engine(url: str, work: Any) -> Any:
    engine: AsyncEngine = create_async_engine(url)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


def _verify(args: argparse.Namespace) -> VerifyReport:
    log_keys = _log_keys(args.key)
    legacy_keys = _receipt_keys(args)
    held = _held_checkpoint(args.checkpoint)
    floor = None
    if args.keep_years is not None:
        floor = RetentionPolicy(args.keep_years).cutoff(datetime.now(UTC))
    if args.sample is not None and args.sample < 1:
        raise SourceError("--sample needs at least one entry")
    if args.export is not None:
        if args.sample is not None:
            raise SourceError("--sample needs a database (--db-url or --data-dir)")
        return verify_export_lines(args.export, log_keys, held, floor, legacy_keys)
    return asyncio.run(
        _with_engine(
            _database_url(args),
            lambda engine: verify_database(engine, log_keys, held, floor, args.sample, legacy_keys),
        )
    )


_KEYS_NOTE = {
    "pinned": "signatures checked against the pinned keys",
    "database": "signatures checked against keys read from the database being verified "
    "(pin them with --key to prove more)",
    "export": "signatures checked against keys read from the export being verified "
    "(pin them with --key to prove more)",
}
_KEYS_SOURCE = {
    "pinned": "the pinned keys",
    "database": "the keys read from the database",
    "export": "the keys read from the export",
}
_METHOD_NOTE = {
    "full": "every retained entry recomputed",
    "consistency": "the latest signed tree head extends the held checkpoint",
    "sample": "random entries proven by inclusion",
}


def _legacy_note(legacy: dict[str, Any] | None) -> str:
    if legacy is None:
        return ""
    if legacy["checked"]:
        return f"; legacy chain through seq {legacy['through_seq']} verified"
    return f"; legacy chain through seq {legacy['through_seq']} not checked ({legacy['reason']})"


def run_verify(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        report = _verify(args)
    except (OSError, ValueError, KeyError, SQLAlchemyError) as exc:
        print(f"audit verify: cannot read the source: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    # Nothing signed was checked (an empty source, or keys that match nothing where no
    # signature failed): the log is not verified, whatever else held.
    unsigned = report.valid and report.signatures == 0
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
    elif unsigned:
        print(
            f"audit log NOT VERIFIED: no signature was checked ({_KEYS_SOURCE[report.keys_source]}"
            f" matched no signature of the source; tree size {report.tree_size})",
            file=out,
        )
    elif report.valid:
        root = report.to_dict()["head"]["root"]
        sampled = f" of {report.sampled} sampled" if report.method == "sample" else ""
        print(
            f"audit log valid ({report.method}: {_METHOD_NOTE[report.method]}): "
            f"{report.checked}{sampled} entries checked, tree size {report.head_size} root "
            f"{root}, {report.checkpoints} checkpoints, {report.anchors} anchors"
            f"{_legacy_note(report.legacy)}; {_KEYS_NOTE[report.keys_source]}",
            file=out,
        )
    elif report.first_bad_seq is None:
        print(f"audit log INVALID: {report.reason}", file=out)
    else:
        print(
            f"audit log INVALID: first bad seq {report.first_bad_seq}: {report.reason} "
            f"({report.checked} entries verified before it)",
            file=out,
        )
    return EXIT_VALID if report.valid and not unsigned else EXIT_INVALID


async def _export(url: str, out: TextIO) -> int:
    async def work(engine: AsyncEngine) -> int:
        count = 0
        async for line in export_lines(engine, datetime.now(UTC)):
            out.write(line)
            count += 1
        return count

    return await _with_engine(url, work)


def run_export(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        url = _database_url(args)
        if args.output is None:
            asyncio.run(_export(url, out))
        else:
            with args.output.open("w", encoding="utf-8") as handle:
                asyncio.run(_export(url, handle))
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"audit export: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    return EXIT_VALID


class ReceiptInvalid(Exception):
    """The receipt was read but does not verify."""


def answer_digest(body: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of a KZG answer without its receipt: the
    ``result_digest`` its audit entry carries (computed here, independently of the
    server's code, from the documented rule)."""
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _check_tree_receipt(
    receipt: dict[str, Any], body: dict[str, Any] | None, vkeys: list[str]
) -> str:
    """Verify an ``{"entry", "proof"}`` receipt; return what it proves."""
    entry, proof = receipt.get("entry"), receipt.get("proof")
    if not isinstance(entry, str) or not isinstance(proof, str):
        raise SourceError('a receipt holds the strings "entry" and "proof"')
    if not vkeys:
        raise SourceError("name the log's verifier key with --key (GET /v1/log/keys lists it)")
    verifiers = [NoteVerifier.from_vkey(vkey) for vkey in _log_keys(vkeys) or []]
    try:
        check = verify_inclusion_proof(entry.encode("utf-8"), proof, verifiers)
    except NoteError as exc:
        raise ReceiptInvalid(str(exc)) from None
    if check.checkpoint.origin not in check.signers:
        raise ReceiptInvalid(
            f"the checkpoint's origin {check.checkpoint.origin!r} is not the name of the key "
            "that signed it"
        )
    try:
        record = json.loads(entry)
        seq = record["seq"]
    except (ValueError, KeyError, TypeError):
        raise ReceiptInvalid("the entry is not an audit record") from None
    if seq != check.index + 1:
        raise ReceiptInvalid(f"the entry says seq {seq}, but the proof is for index {check.index}")
    if body is not None and record.get("result_digest") != answer_digest(body):
        raise ReceiptInvalid(
            "the answer is not the result its audit entry logged (result_digest differs)"
        )
    bound = "; the answer matches the entry's result_digest" if body is not None else ""
    return (
        f"request_id {record.get('request_id')}, seq {seq} (index {check.index}) in the "
        f"checkpoint of size {check.checkpoint.size} signed by {', '.join(check.signers)}{bound}"
    )


def _check_legacy_receipt(
    receipt: dict[str, Any], body: dict[str, Any] | None, keys: dict[str, bytes] | None
) -> str:
    """Verify a first-release BLS receipt; return what it says."""
    if keys is None:
        raise SourceError(
            "a first-release BLS receipt: give its key with --receipt-key KEY_ID=HEX or "
            "--receipt-keys FILE (GET /v1/keys/receipts)"
        )
    key_id, message = receipt.get("key_id"), receipt.get("message")
    signature = receipt.get("signature")
    if not all(isinstance(v, str) for v in (key_id, message, signature)):
        raise SourceError("a BLS receipt holds key_id, message and signature")
    if not bls_signature_valid(keys, str(key_id), str(message), str(signature)):
        raise ReceiptInvalid(f"the BLS signature by {key_id} does not verify")
    try:
        signed = json.loads(str(message))
    except ValueError:
        raise ReceiptInvalid("the signed message is not JSON") from None
    said = (
        f"request_id {signed.get('request_id')}, audit seq {signed.get('audit_seq')}, "
        f"signed by {key_id} (first-release BLS receipt)"
    )
    if body is not None and signed.get("output") != body:
        said += "; the signed output is not the answer as given (lists are signed as digests)"
    return said


def _tlog_proof_file(text: str) -> dict[str, Any]:
    """A saved ``.tlog-proof`` (what ``gateway.client.Receipt.save`` writes): the C2SP
    proof whose ``extra`` line carries the entry, as the receipt ``{"entry", "proof"}``."""
    proof = parse_tlog_proof(text)
    if proof.extra is None:
        raise SourceError("the tlog-proof carries no entry (no extra line)")
    return {"entry": proof.extra.decode("utf-8"), "proof": text}


def run_verify_receipt(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        text = args.file.read_text(encoding="utf-8")
        saved_proof = text.startswith(PROOF_HEADER + "\n")
        data = _tlog_proof_file(text) if saved_proof else json.loads(text)
        if not isinstance(data, dict):
            raise SourceError("expected a JSON object")
        body: dict[str, Any] | None = None
        receipt = data
        if "receipt" in data:
            receipt = data["receipt"]
            body = {k: v for k, v in data.items() if k != "receipt"}
        if not isinstance(receipt, dict):
            raise SourceError("the receipt is not a JSON object")
        if receipt.get("scheme") == LEGACY_RECEIPT_SCHEME:
            said = _check_legacy_receipt(receipt, body, _receipt_keys(args))
        else:
            said = _check_tree_receipt(receipt, body, args.key)
    except ReceiptInvalid as exc:
        print(f"receipt INVALID: {exc}", file=out)
        return EXIT_INVALID
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"audit verify-receipt: cannot read the receipt: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(f"receipt valid: {said}", file=out)
    return EXIT_VALID
