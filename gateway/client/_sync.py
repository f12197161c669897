"""``GatewayClient``: the synchronous client.

It runs an ``AsyncGatewayClient`` on a private event loop in a daemon thread, so both
clients share one implementation of retries, login and verification, the sync client is
safe to share between threads (calls run concurrently on the loop), and it works from
code that already runs an event loop (a notebook, say).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

from audit.tlog import Checkpoint
from gateway.client._async import AsyncGatewayClient, ClientOptions
from gateway.client._operations import (
    BatchResult,
    BlobProofResult,
    CellsResult,
    CommitmentResult,
    KZGProofResult,
    Operation,
    VerifyResult,
)

__all__ = ["GatewayClient"]

T = TypeVar("T")


class GatewayClient:
    """The gateway's synchronous client; same keyword arguments as ``AsyncGatewayClient``.
    Use it as a ``with`` context manager (or call ``close()``)."""

    def __init__(self, **options: Unpack[ClientOptions]) -> None:
        # Checked here, in the caller's thread, so a bad option fails at construction.
        self._client = AsyncGatewayClient(**options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kzg-gateway-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): do not leave the call running
            raise

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the private loop."""
        if self._closed:
            return
        self._run(self._client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def latest_checkpoint(self) -> str | None:
        """See ``AsyncGatewayClient.latest_checkpoint``."""
        return self._client.latest_checkpoint

    def blob_to_kzg_commitment(self, blob: bytes) -> CommitmentResult:
        return self._run(self._client.blob_to_kzg_commitment(blob))

    def compute_kzg_proof(self, blob: bytes, z: bytes) -> KZGProofResult:
        return self._run(self._client.compute_kzg_proof(blob, z))

    def compute_blob_kzg_proof(self, blob: bytes, commitment: bytes) -> BlobProofResult:
        return self._run(self._client.compute_blob_kzg_proof(blob, commitment))

    def verify_kzg_proof(self, commitment: bytes, z: bytes, y: bytes, proof: bytes) -> VerifyResult:
        return self._run(self._client.verify_kzg_proof(commitment, z, y, proof))

    def verify_blob_kzg_proof(self, blob: bytes, commitment: bytes, proof: bytes) -> VerifyResult:
        return self._run(self._client.verify_blob_kzg_proof(blob, commitment, proof))

    def verify_blob_kzg_proof_batch(
        self, blobs: Sequence[bytes], commitments: Sequence[bytes], proofs: Sequence[bytes]
    ) -> VerifyResult:
        return self._run(self._client.verify_blob_kzg_proof_batch(blobs, commitments, proofs))

    def compute_cells_and_kzg_proofs(self, blob: bytes) -> CellsResult:
        return self._run(self._client.compute_cells_and_kzg_proofs(blob))

    def recover_cells_and_kzg_proofs(
        self, cell_indices: Sequence[int], cells: Sequence[bytes]
    ) -> CellsResult:
        return self._run(self._client.recover_cells_and_kzg_proofs(cell_indices, cells))

    def verify_cell_kzg_proof_batch(
        self,
        commitments: Sequence[bytes],
        cell_indices: Sequence[int],
        cells: Sequence[bytes],
        proofs: Sequence[bytes],
    ) -> VerifyResult:
        return self._run(
            self._client.verify_cell_kzg_proof_batch(commitments, cell_indices, cells, proofs)
        )

    def batch(self, operations: Sequence[Operation]) -> BatchResult:
        return self._run(self._client.batch(operations))

    def published_log_keys(self) -> list[str]:
        return self._run(self._client.published_log_keys())

    def fetch_checkpoint(self) -> Checkpoint:
        return self._run(self._client.fetch_checkpoint())
