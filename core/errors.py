"""User-facing errors: raised with a message a user can act on, printed as one line by the CLI."""

from __future__ import annotations


class VerticalsError(Exception):
    """Base class for errors whose message is meant for the user (no traceback is shown)."""


class ConfigError(VerticalsError):
    """A setting is missing, malformed or unsafe."""


class DataError(VerticalsError):
    """Input data is missing, corrupt or in the wrong format."""


class ServiceUnavailable(VerticalsError):
    """A database, broker or worker cannot be reached."""


class ModelNotReady(VerticalsError):
    """A model needed for this operation has not been trained yet."""
