"""KZG commitments and proofs (EIP-4844 blobs, EIP-7594 cells) on BLS12-381.

A library: no HTTP, no database. ``load_engine("blspy")`` is our own engine,
``load_engine("ckzg")`` wraps c-kzg-4844 (the optional ``ckzg`` extra).
"""

from .engines import ENGINE_NAMES, Engine, load_engine
from .errors import KZGError

__all__ = ["ENGINE_NAMES", "Engine", "KZGError", "load_engine"]
