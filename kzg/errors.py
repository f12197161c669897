"""The one exception the KZG engines raise on bad input."""

from __future__ import annotations


class KZGError(ValueError):
    """Invalid input: wrong length, non-canonical element, bad point or index.

    ``argument`` names the offending argument (None when no single one is at fault),
    ``index`` the offending item when it is a list, ``reason`` what is wrong with it;
    the message is built from them: ``"blobs[3]: expected 131072 bytes, got 5"``.
    """

    def __init__(self, reason: str, argument: str | None = None, index: int | None = None) -> None:
        self.reason = reason
        self.argument = argument
        self.index = index
        super().__init__(reason if self.where is None else f"{self.where}: {reason}")

    @property
    def where(self) -> str | None:
        """The argument at fault as a message names it: ``blob``, ``blobs[3]``."""
        if self.argument is None:
            return None
        return self.argument if self.index is None else f"{self.argument}[{self.index}]"
