"""Reading the consensus-spec KZG test vectors (``<function>/kzg-mainnet/<case>/data.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import SPEC_TESTS


@dataclass(frozen=True)
class Case:
    name: str
    input: dict[str, Any]
    output: Any

    @property
    def must_fail(self) -> bool:
        return self.output is None


class BadHex(Exception):
    """An input the vector gives as malformed hex: the call must be refused."""


def decode(value: Any) -> Any:
    """Turn the vectors' 0x-hex strings (and lists of them) into bytes; ints stay ints."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, str):
        try:
            return bytes.fromhex(value.removeprefix("0x"))
        except ValueError as exc:
            raise BadHex(value[:20]) from exc
    return value


def cases(function: str) -> list[Case]:
    """Every case of ``function``, sorted by name; empty when the vectors are missing
    (the ``spec_tests_dir`` fixture then fails the run under CI)."""
    root = SPEC_TESTS / function / "kzg-mainnet"
    if not root.is_dir():
        return []
    found = []
    for path in sorted(Path(root).iterdir()):
        with (path / "data.yaml").open() as handle:
            # The C loader: the pure-Python one takes seconds per 128 KiB blob.
            data = yaml.load(handle, Loader=yaml.CSafeLoader)
        found.append(Case(path.name, data["input"], data["output"]))
    return found


def ids(found: list[Case]) -> list[str]:
    return [case.name for case in found]
