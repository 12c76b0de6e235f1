"""The exit-code contract shared by every stage and command: 2 for bad input, 1 for anything else."""

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """The user's params, data or model cannot be used; stages exit with code 2 and write nothing.
    The message names the key or file at fault."""
