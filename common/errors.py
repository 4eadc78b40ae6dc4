"""Exceptions that the stage wrapper turns into exit codes.

``UserError`` (and its subclasses) means bad input or configuration: the wrapper prints its
one-line message without a traceback and exits 2. Anything else is unexpected: exit 1 with the
traceback in ``log.txt``.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration. The message is one line and names the file or key."""


class ConfigError(UserError):
    """A configuration key is unknown, missing or of the wrong type."""


class StaleUpstreamError(UserError):
    """An upstream stage is missing, unfinished or changed: the message names the stage to run."""


class ImageReadError(UserError):
    """An image cannot be decoded; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (exit 1, e-mail, state saved)."""
