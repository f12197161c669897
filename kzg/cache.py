"""On-disk cache of precomputed point tables.

A table is only ever derived from a setup file that was fully validated, and its file
name and header carry that file's SHA-256, so a cached table stands for the validation
too. The header also holds the SHA-256 of the payload: a truncated or corrupted file is
detected, ignored and rebuilt. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "KZG_GATEWAY_CACHE_DIR"
_MAGIC = b"KZGTABLE\x01"


def default_cache_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``$KZG_GATEWAY_CACHE_DIR``, else ``~/.cache/kzg-gateway``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "kzg-gateway"


def table_path(cache_dir: Path, kind: str, meta: dict[str, Any]) -> Path:
    tag = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{kind}-{tag}.bin"


def read_table(path: Path, meta: dict[str, Any]) -> bytes | None:
    """Return the payload stored under ``meta``, or None when absent, stale or corrupt."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_MAGIC):
        return None
    head = len(_MAGIC)
    digest = data[head : head + 32]
    meta_len = int.from_bytes(data[head + 32 : head + 36], "big")
    body_start = head + 36 + meta_len
    try:
        stored_meta = json.loads(data[head + 36 : body_start])
    except ValueError:
        return None
    if stored_meta != meta:
        return None
    payload = data[body_start:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def write_table(path: Path, meta: dict[str, Any], payload: bytes) -> bool:
    """Store ``payload`` atomically; False when the cache directory is not writable."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    blob = (
        _MAGIC
        + hashlib.sha256(payload).digest()
        + len(meta_bytes).to_bytes(4, "big")
        + meta_bytes
        + payload
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError:
        return False
    return True
