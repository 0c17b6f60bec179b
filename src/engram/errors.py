"""Errors that engram shows to users: each message names what is wrong and how to fix it."""


class EngramError(Exception):
    """Base class for user-facing errors; the CLI prints these without a traceback."""


class ConfigError(EngramError):
    """A configuration key is unknown, has the wrong type, or is out of range."""


class DataError(EngramError):
    """A data file is missing, truncated, or does not match its format."""


class DivergenceError(EngramError):
    """Training produced a non-finite loss."""
