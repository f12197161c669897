"""``AsyncGatewayClient``: the asyncio client, and the one implementation of the protocol
(``GatewayClient`` runs it on a private event loop).

A call: encode the inputs (and hash them), send with the credential, retry 429/503 after
``Retry-After``, map error envelopes to exceptions, then verify the receipt against the
pinned log keys, check that its entry binds this exchange, and check the checkpoint's
consistency with the last one this client saw, before the typed result is returned.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypedDict

import aiohttp
from multidict import CIMultiDictProxy

from audit.merkle import EMPTY_ROOT, verify_consistency
from audit.note import NoteVerifier
from audit.tlog import Checkpoint
from gateway.client._errors import (
    ConsistencyError,
    InvalidInput,
    InvalidResponse,
    ReceiptError,
    Timeout,
    TransportError,
    Unauthenticated,
    error_for_answer,
)
from gateway.client._operations import (
    SPECS,
    BatchItemError,
    BatchResult,
    BlobProofResult,
    CellsResult,
    CommitmentResult,
    KZGProofResult,
    Operation,
    OperationSpec,
    Result,
    VerifyResult,
)
from gateway.client._receipts import (
    Receipt,
    StrPath,
    VerifiedReceipt,
    load_verifiers,
    open_log_checkpoint,
    result_digest,
    verify_receipt,
)

__all__ = ["AsyncGatewayClient", "ClientOptions", "TotpSource"]

log = logging.getLogger("gateway.client")

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
BATCH_PATH = "/v1/kzg/batch"
BATCH_ACTION = "kzg_batch"
BYTES_PER_BLOB = 131072
USER_AGENT = "kzg-gateway-client/0.1"
# A checkpoint size the client has proven on its line of history: enough to answer the
# checkpoints of concurrent calls (which share group commits) without asking the log.
_KNOWN_SIZES = 4096
# Statuses after which a pure operation may simply be sent again.
_RETRY_STATUSES = frozenset({429, 503})
# A TOTP code is single-use; a new one appears every period (30 s by RFC 6238).
_TOTP_WAIT_SECONDS = 35.0

TotpSource = str | Callable[[], str]
_jitter = random.SystemRandom()


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of both clients (defaults: ``AsyncGatewayClient``)."""

    base_url: str
    api_key: str | None
    username: str | None
    password: str | None
    totp: TotpSource | None
    ca_file: StrPath | None
    ssl_context: ssl.SSLContext | None
    log_keys: Sequence[str] | None
    origin: str | None
    verify_receipts: bool
    check_consistency: bool
    trusted_checkpoint: str | None
    timeout: float
    retries: int
    backoff: float
    max_retry_wait: float
    max_connections: int


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    request_id: str | None


class AsyncGatewayClient:
    """The gateway's asyncio client. Build it with keyword arguments and use it as an
    ``async with`` context manager (or ``await client.close()``).

    Credentials: ``api_key`` (machines), or ``username`` + ``password`` (+ ``totp``: a
    code, or a callable returning the current code, e.g. ``pyotp.TOTP(secret).now``,
    which refresh needs for roles with MFA). Receipts are verified against ``log_keys``
    (C2SP verifier keys, pinned out of band); without keys the client refuses to start
    unless ``verify_receipts=False``. See docs/client.md.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        totp: TotpSource | None = None,
        ca_file: StrPath | None = None,
        ssl_context: ssl.SSLContext | None = None,
        log_keys: Sequence[str] | None = None,
        origin: str | None = None,
        verify_receipts: bool = True,
        check_consistency: bool = True,
        trusted_checkpoint: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_retry_wait: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        if not base_url.startswith("https://"):
            raise ValueError("base_url must be https:// (the gateway speaks TLS 1.3 only)")
        if (api_key is None) == (username is None):
            raise ValueError("give exactly one credential: api_key, or username and password")
        if username is not None and password is None:
            raise ValueError("username needs password")
        if ca_file is not None and ssl_context is not None:
            raise ValueError("give ca_file or ssl_context, not both")
        if retries < 0 or timeout <= 0 or backoff < 0 or max_retry_wait < 0:
            raise ValueError("retries, backoff and max_retry_wait must be >= 0, timeout > 0")
        self._verifiers: tuple[NoteVerifier, ...] = load_verifiers(log_keys or ())
        if verify_receipts and not self._verifiers:
            raise ValueError(
                "log_keys is required to verify receipts: pin the log's verifier keys "
                "(GET /v1/log/keys, obtained out of band), or pass verify_receipts=False"
            )
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._username = username
        self._password = password
        self._totp = totp
        self._ssl = ssl_context or _tls13_context(ca_file)
        self._origin = origin
        self._verify = verify_receipts
        self._check_consistency = verify_receipts and check_consistency
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff
        self._max_retry_wait = max_retry_wait
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._last_totp: str | None = None
        self._login_lock = asyncio.Lock()
        self._log_lock = asyncio.Lock()
        self._trusted: tuple[Checkpoint, str] | None = None
        self._known: dict[int, bytes] = {}
        if trusted_checkpoint is not None:
            if not self._verifiers:
                raise ValueError("trusted_checkpoint needs log_keys to be verified")
            self._remember(self._open_checkpoint(trusted_checkpoint), trusted_checkpoint)

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> AsyncGatewayClient:
        self._get_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections; the client cannot be used afterwards."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers={"User-Agent": USER_AGENT}
            )
        return self._session

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest signed checkpoint this client verified (note text): keep it and pass
        it as ``trusted_checkpoint`` next time to go on checking consistency from it."""
        return self._trusted[1] if self._trusted else None

    # ---- the KZG operations ----------------------------------------------------------

    async def blob_to_kzg_commitment(self, blob: bytes) -> CommitmentResult:
        return await self._operation("blob_to_kzg_commitment", blob)  # type: ignore[return-value]

    async def compute_kzg_proof(self, blob: bytes, z: bytes) -> KZGProofResult:
        return await self._operation("compute_kzg_proof", blob, z)  # type: ignore[return-value]

    async def compute_blob_kzg_proof(self, blob: bytes, commitment: bytes) -> BlobProofResult:
        return await self._operation("compute_blob_kzg_proof", blob, commitment)  # type: ignore[return-value]

    async def verify_kzg_proof(
        self, commitment: bytes, z: bytes, y: bytes, proof: bytes
    ) -> VerifyResult:
        return await self._operation("verify_kzg_proof", commitment, z, y, proof)  # type: ignore[return-value]

    async def verify_blob_kzg_proof(
        self, blob: bytes, commitment: bytes, proof: bytes
    ) -> VerifyResult:
        return await self._operation("verify_blob_kzg_proof", blob, commitment, proof)  # type: ignore[return-value]

    async def verify_blob_kzg_proof_batch(
        self, blobs: Sequence[bytes], commitments: Sequence[bytes], proofs: Sequence[bytes]
    ) -> VerifyResult:
        return await self._operation("verify_blob_kzg_proof_batch", blobs, commitments, proofs)  # type: ignore[return-value]

    async def compute_cells_and_kzg_proofs(self, blob: bytes) -> CellsResult:
        return await self._operation("compute_cells_and_kzg_proofs", blob)  # type: ignore[return-value]

    async def recover_cells_and_kzg_proofs(
        self, cell_indices: Sequence[int], cells: Sequence[bytes]
    ) -> CellsResult:
        return await self._operation("recover_cells_and_kzg_proofs", cell_indices, cells)  # type: ignore[return-value]

    async def verify_cell_kzg_proof_batch(
        self,
        commitments: Sequence[bytes],
        cell_indices: Sequence[int],
        cells: Sequence[bytes],
        proofs: Sequence[bytes],
    ) -> VerifyResult:
        return await self._operation(  # type: ignore[return-value]
            "verify_cell_kzg_proof_batch", commitments, cell_indices, cells, proofs
        )

    async def batch(self, operations: Sequence[Operation]) -> BatchResult:
        """Run several operations as one request (``POST /v1/kzg/batch``), in parallel on
        the gateway: one audit entry, one receipt; results in order, a refused item as
        ``BatchItemError`` (the others still have their results)."""
        operations = list(operations)
        if not operations or not all(isinstance(op, Operation) for op in operations):
            raise TypeError("batch takes a non-empty list of Operation")
        document = {"operations": [op.to_json() for op in operations]}
        answer = await self._send("POST", BATCH_PATH, _dumps(document), JSON)
        body = _json_object(answer)
        items = body.get("results")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise InvalidResponse(
                "results: expected a list of objects", request_id=answer.request_id
            )
        if len(items) != len(operations):
            raise InvalidResponse(
                f"results: {len(items)} items for {len(operations)} operations",
                request_id=answer.request_id,
            )
        common = await self._accept(
            answer, body, lambda verified: _check_batch_binding(verified, operations, items)
        )
        results: list[Result | BatchItemError] = []
        for index, (op, item) in enumerate(zip(operations, items, strict=True)):
            error = item.get("error")
            if isinstance(error, dict):
                code, message = str(error.get("code")), str(error.get("message"))
                results.append(BatchItemError(index, code, message))
            else:
                results.append(_parse(SPECS[op.name], item, common, answer.request_id))
        return BatchResult(results=tuple(results), **common)

    async def _operation(self, name: str, *args: Any) -> Result:
        spec = SPECS[name]
        raw, digests = spec.encode(args)
        # A blob goes raw (half the bytes of hex) only when it has a blob's size: any
        # other gets the JSON route's answer, 400 naming the field, not a 413.
        if spec.raw_blob and len(raw["blob"]) == BYTES_PER_BLOB:
            payload, content_type = raw["blob"], OCTET_STREAM
        else:
            payload, content_type = _dumps(spec.to_json(raw)), JSON
        answer = await self._send("POST", spec.path, payload, content_type)
        body = _json_object(answer)
        common = await self._accept(
            answer, body, lambda verified: _check_binding(verified, name, digests)
        )
        return _parse(spec, body, common, answer.request_id)

    # ---- the log ---------------------------------------------------------------------

    async def published_log_keys(self) -> list[str]:
        """The verifier keys the gateway publishes (``GET /v1/log/keys``, current and
        retired). Trust on first use: pin keys obtained out of band where it matters."""
        answer = await self._send("GET", "/v1/log/keys", authenticate=False)
        keys = _json_object(answer).get("keys")
        if not isinstance(keys, list) or not all(
            isinstance(k, dict) and isinstance(k.get("vkey"), str) for k in keys
        ):
            raise InvalidResponse("keys: expected a list of {vkey, ...}")
        return [k["vkey"] for k in keys]

    async def fetch_checkpoint(self) -> Checkpoint:
        """Fetch the log's latest signed checkpoint, verify it with the pinned keys and
        (with ``check_consistency``) prove that it extends the last one seen."""
        if not self._verifiers:
            raise ValueError("fetch_checkpoint needs log_keys")
        answer = await self._send("GET", "/v1/log/checkpoint")
        try:
            note = answer.body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidResponse("the checkpoint is not UTF-8 text") from None
        try:
            checkpoint = self._open_checkpoint(note)
        except ReceiptError as exc:
            exc.request_id = answer.request_id
            raise
        if self._check_consistency:
            await self._observe(checkpoint, note)
        return checkpoint

    def _open_checkpoint(self, note: str) -> Checkpoint:
        return open_log_checkpoint(note, self._verifiers, self._origin)

    def _remember(self, checkpoint: Checkpoint, note: str) -> None:
        if len(self._known) >= _KNOWN_SIZES:
            del self._known[next(iter(self._known))]
        self._known[checkpoint.size] = checkpoint.root
        if self._trusted is None or checkpoint.size > self._trusted[0].size:
            self._trusted = (checkpoint, note)

    async def _observe(self, checkpoint: Checkpoint, note: str) -> None:
        """Prove ``checkpoint`` and the newest one trusted lie on one history.

        Serialised: each new size is proven against the current newest, so everything
        accepted is a prefix of it (the prefix relation is transitive).
        """
        async with self._log_lock:
            known_root = self._known.get(checkpoint.size)
            if known_root is not None:
                if known_root != checkpoint.root:
                    raise ConsistencyError(
                        f"two different trees of size {checkpoint.size} were signed"
                    )
                return
            if self._trusted is None:
                self._remember(checkpoint, note)
                return
            trusted = self._trusted[0]
            old, new = sorted((trusted, checkpoint), key=lambda c: c.size)
            hashes = [] if old.size == 0 else await self._consistency_proof(old.size, new.size)
            old_root = EMPTY_ROOT if old.size == 0 else old.root
            if old.size == 0 and old.root != EMPTY_ROOT:
                raise ConsistencyError("a signed empty tree with a non-empty root")
            if not verify_consistency(old.size, new.size, old_root, new.root, hashes):
                raise ConsistencyError(
                    f"the log's tree of size {new.size} does not extend its tree of size "
                    f"{old.size} that this client saw"
                )
            self._remember(checkpoint, note)

    async def _consistency_proof(self, old: int, size: int) -> list[bytes]:
        path = f"/v1/log/proof/consistency?old={old}&size={size}"
        try:
            answer = await self._send("GET", path)
        except InvalidInput as exc:
            # The log signed both sizes; refusing to relate them is itself a fork sign.
            raise ConsistencyError(
                f"the log cannot prove size {size} extends size {old}: {exc.message}",
                request_id=exc.request_id,
            ) from None
        body = _json_object(answer)
        hashes = body.get("hashes")
        if body.get("old") != old or body.get("size") != size or not isinstance(hashes, list):
            raise InvalidResponse(
                "not the consistency proof asked for", request_id=answer.request_id
            )
        try:
            return [base64.b64decode(h, validate=True) for h in hashes]
        except (TypeError, ValueError, binascii.Error):
            raise InvalidResponse("hashes: not base64", request_id=answer.request_id) from None

    # ---- receipts --------------------------------------------------------------------

    async def _accept(
        self, answer: _Answer, body: dict[str, Any], binds: Callable[[VerifiedReceipt], None]
    ) -> dict[str, Any]:
        """Verify the receipt (its request id and result digest are this answer's), check
        with ``binds`` that its entry records this very call, and check the checkpoint's
        consistency; return the fields every result carries."""
        request_id = answer.request_id
        if not request_id:
            raise InvalidResponse("the answer has no X-Request-ID")
        try:
            receipt = Receipt.from_dict({"receipt": body.get("receipt")})
            verified = None
            if self._verify:
                verified = verify_receipt(
                    receipt, self._verifiers, self._origin, answer=body, request_id=request_id
                )
                binds(verified)
                if self._check_consistency:
                    await self._observe(verified.checkpoint, verified.checkpoint_note)
        except ReceiptError as exc:
            exc.request_id = request_id
            raise
        return {"receipt": receipt, "request_id": request_id, "verified": verified, "answer": body}

    # ---- transport -------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        payload: bytes | None = None,
        content_type: str | None = None,
        *,
        authenticate: bool = True,
    ) -> _Answer:
        """One exchange: retried on 429/503 (after Retry-After) and dropped connections;
        after a 401 with a login, logs in again once. Returns a 2xx answer or raises."""
        session = self._get_session()
        url = self._base_url + path
        relogged = False
        attempt = 0
        while True:
            headers = await self._credential() if authenticate else {}
            if content_type is not None:
                headers["Content-Type"] = content_type
            try:
                # No redirects: X-API-Key is not a header aiohttp drops when leaving the origin.
                async with session.request(
                    method, url, data=payload, headers=headers, allow_redirects=False
                ) as resp:
                    answer = _Answer(
                        resp.status,
                        resp.headers,
                        await resp.read(),
                        resp.headers.get("X-Request-ID"),
                    )
            except TimeoutError:
                raise Timeout(f"{method} {path}: no answer within the timeout") from None
            except aiohttp.ClientSSLError as exc:
                raise TransportError(f"{method} {path}: TLS failed: {exc}") from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                wait = self._backoff_wait(attempt, None)
                if attempt >= self._retries or wait is None:
                    raise TransportError(f"{method} {path}: {exc!r}") from exc
                log.info("%s %s: %r; retrying in %.2f s", method, path, exc, wait)
                attempt += 1
                await asyncio.sleep(wait)
                continue
            if 200 <= answer.status < 300:
                return answer
            error = error_for_answer(answer.status, answer.body, answer.headers, answer.request_id)
            if answer.status == 401 and authenticate and self._username and not relogged:
                # The token may have been revoked or its key rotated: one fresh login.
                relogged = True
                self._token = None
                continue
            wait = self._backoff_wait(attempt, error.retry_after)
            if answer.status not in _RETRY_STATUSES or attempt >= self._retries or wait is None:
                raise error
            log.info(
                "%s %s: %s %s (request %s); retry %d/%d in %.2f s",
                method, path, answer.status, error.code, answer.request_id,
                attempt + 1, self._retries, wait,
            )  # fmt: skip
            attempt += 1
            await asyncio.sleep(wait)

    def _backoff_wait(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before the next attempt, or None when the server asks for longer than
        ``max_retry_wait`` (better to tell the caller than to sleep blind)."""
        if retry_after is not None:
            if retry_after > self._max_retry_wait:
                return None
            # A little later than asked, spread so that shed clients do not return at once.
            return retry_after + _jitter.uniform(0, min(0.1 * retry_after, 0.5))
        return min(self._max_retry_wait, _jitter.uniform(0, self._backoff * 2**attempt))

    async def _credential(self) -> dict[str, str]:
        if self._api_key is not None:
            return {"X-API-Key": self._api_key}
        if self._token is None or time.monotonic() >= self._token_refresh_at:
            async with self._login_lock:
                if self._token is None or time.monotonic() >= self._token_refresh_at:
                    await self._login()
        return {"Authorization": f"Bearer {self._token}"}

    async def _login(self) -> None:
        """``POST /v1/auth/login``; the token is refreshed a little before it expires."""
        document: dict[str, str] = {
            "username": str(self._username),
            "password": str(self._password),
        }
        code = await self._totp_code()
        if code is not None:
            document["totp"] = code
        answer = await self._send(
            "POST", "/v1/auth/login", _dumps(document), JSON, authenticate=False
        )
        body = _json_object(answer)
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires_in, int) or expires_in <= 0:
            raise InvalidResponse("login: expected access_token and expires_in")
        self._token = token
        self._token_refresh_at = time.monotonic() + expires_in - min(60.0, expires_in / 4)
        log.info("logged in as %s (token for %d s)", self._username, expires_in)

    async def _totp_code(self) -> str | None:
        """The code for the next login. A code is accepted once: a callable is asked
        again until it gives a new one; a fixed code serves the first login only."""
        if self._totp is None:
            return None
        if isinstance(self._totp, str):
            code, self._totp = self._totp, None
            self._last_totp = code
            return code
        deadline = time.monotonic() + _TOTP_WAIT_SECONDS
        code = self._totp()
        while code == self._last_totp and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            code = self._totp()
        if code == self._last_totp:
            raise Unauthenticated("the TOTP source keeps giving the code already used")
        self._last_totp = code
        return code


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _tls13_context(ca_file: StrPath | None) -> ssl.SSLContext:
    """Certificate and host name checked; TLS 1.3 only, as the gateway."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _json_object(answer: _Answer) -> dict[str, Any]:
    try:
        body = json.loads(answer.body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidResponse("the answer is not JSON", request_id=answer.request_id) from None
    if not isinstance(body, dict):
        raise InvalidResponse("the answer is not a JSON object", request_id=answer.request_id)
    return body


def _parse(
    spec: OperationSpec, body: dict[str, Any], common: dict[str, Any], request_id: str | None
) -> Result:
    try:
        return spec.parse(body, **common)
    except InvalidResponse as exc:
        exc.request_id = request_id
        raise


def _check_outcome(entry: dict[str, Any], action: str) -> None:
    if entry.get("action") != action:
        raise ReceiptError(f"the entry is for {entry.get('action')!r}, not {action!r}")
    if entry.get("outcome") != "success" or entry.get("http_status") != 200:
        raise ReceiptError("the entry does not record a successful answer")


def _check_binding(verified: VerifiedReceipt, action: str, digests: dict[str, str]) -> None:
    """The entry must be this operation's successful answer to exactly these inputs (its
    request id and result digest were checked by ``verify_receipt``)."""
    _check_outcome(verified.entry, action)
    if verified.entry.get("input_digests") != digests:
        raise ReceiptError("the entry's input_digests are not the digests of what was sent")


def _check_batch_binding(
    verified: VerifiedReceipt, operations: list[Operation], items: list[dict[str, Any]]
) -> None:
    """The entry must be this batch: every input digest it names (``operations[i].field``)
    is that of what was sent, an item that has a result names all of its inputs, and its
    list of operations is ours, each with its result's digest or its error."""
    entry = verified.entry
    _check_outcome(entry, BATCH_ACTION)
    logged = entry.get("input_digests")
    sent = {
        f"operations[{i}].{name}": digest
        for i, op in enumerate(operations)
        for name, digest in op.digests.items()
    }
    if not isinstance(logged, dict) or any(sent.get(k) != v for k, v in logged.items()):
        raise ReceiptError("the entry's input_digests are not the digests of what was sent")
    detail = entry.get("detail")
    listed = detail.get("operations") if isinstance(detail, dict) else None
    if not isinstance(listed, list) or len(listed) != len(operations):
        raise ReceiptError("the entry does not list this batch's operations")
    for i, (op, item, logged_op) in enumerate(zip(operations, items, listed, strict=True)):
        if not isinstance(logged_op, dict) or logged_op.get("operation") != op.name:
            raise ReceiptError(f"operations[{i}]: the entry logged another operation")
        if "error" in item:
            continue
        if any(f"operations[{i}].{name}" not in logged for name in op.digests):
            raise ReceiptError(f"operations[{i}]: the entry does not name all its inputs")
        if logged_op.get("result_digest") != result_digest(item):
            raise ReceiptError(f"operations[{i}]: the entry logged another result")
