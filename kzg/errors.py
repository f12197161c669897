"""The one exception the KZG engines raise on bad input."""


class KZGError(ValueError):
    """Invalid input: wrong length, non-canonical element, bad point or index.

    The message names the offending argument (and index, for lists).
    """
