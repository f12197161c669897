"""Who is calling: a person (JWT after password + TOTP) or a machine (API key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Principal:
    """An authenticated caller; ``mfa`` is true when the credential proves a second factor."""

    id: str
    kind: Literal["user", "api_key"]
    name: str
    roles: tuple[str, ...]
    mfa: bool = False
