"""The gateway's Python SDK: a client that verifies every answer before handing it back.

```python
from gateway.client import GatewayClient

with GatewayClient(base_url=URL, api_key=KEY, ca_file=CA, log_keys=[VKEY]) as gw:
    result = gw.blob_to_kzg_commitment(blob)       # receipt verified, or ReceiptError
    result.commitment, result.versioned_hash, result.request_id
    result.receipt.save("commitment.tlog-proof")
```

``AsyncGatewayClient`` is the asyncio twin; ``verify_receipt`` checks a receipt offline
with no server. It needs only what the distribution installs (aiohttp's client and the
``audit`` package's verifier, which the auditor's CLI runs too), nothing of the server.
Guide: docs/client.md.
"""

from gateway.client._async import AsyncGatewayClient, ClientOptions, TotpSource
from gateway.client._errors import (
    ConsistencyError,
    Forbidden,
    GatewayError,
    InvalidInput,
    InvalidResponse,
    NotFound,
    RateLimited,
    ReceiptError,
    RequestError,
    ServerError,
    Timeout,
    TooLarge,
    TransportError,
    Unauthenticated,
    Unavailable,
)
from gateway.client._operations import (
    BatchItemError,
    BatchResult,
    BlobProofResult,
    CellsResult,
    CommitmentResult,
    KZGProofResult,
    Operation,
    Result,
    VerifyResult,
)
from gateway.client._receipts import (
    Receipt,
    VerifiedReceipt,
    kzg_to_versioned_hash,
    verify_receipt,
)
from gateway.client._sync import GatewayClient

__all__ = [
    "AsyncGatewayClient",
    "BatchItemError",
    "BatchResult",
    "BlobProofResult",
    "CellsResult",
    "ClientOptions",
    "CommitmentResult",
    "ConsistencyError",
    "Forbidden",
    "GatewayClient",
    "GatewayError",
    "InvalidInput",
    "InvalidResponse",
    "KZGProofResult",
    "NotFound",
    "Operation",
    "RateLimited",
    "Receipt",
    "ReceiptError",
    "RequestError",
    "Result",
    "ServerError",
    "Timeout",
    "TooLarge",
    "TotpSource",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "VerifiedReceipt",
    "VerifyResult",
    "kzg_to_versioned_hash",
    "verify_receipt",
]
