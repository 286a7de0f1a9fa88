"""The errors kcompress raises for bad input: the CLI prints them as one line, no traceback."""

__all__ = ["KcompressError", "UsageError"]


class KcompressError(Exception):
    """A problem with the user's input or environment. Exit code 1."""

    exit_code = 1


class UsageError(KcompressError):
    """A bad argument or option value. Exit code 2, like click's own usage errors."""

    exit_code = 2
