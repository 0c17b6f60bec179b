"""Errors that engram shows to users: each message names what is wrong and how to fix it."""


class EngramError(Exception):
    """Base class for user-facing errors; the CLI prints these without a traceback."""


class ConfigError(EngramError):
    """A configuration key is unknown, has the wrong type, or is out of range."""


class DataError(EngramError):
    """A data file is missing, truncated, or does not match its format."""


class DivergenceError(EngramError):
    """Training produced a non-finite loss."""


def one_line(error: BaseException) -> str:
    """An error's type and the first line of its message, for a one-line report of an
    exception from code engram does not own (a plugin, a Ray task)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
