"""Exceptions shared across stages."""


class BadInput(Exception):
    """The user's params or data cannot be used; stages exit with code 2 and write nothing."""
