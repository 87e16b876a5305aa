"""Exceptions raised by lit_parallel for bad user input.

Every user-facing check raises :class:`ConfigurationError` *before* any process-group work, with a
message that names the bad value and the valid choices. The CLI prints it as one line and exits 2.
"""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A user-supplied setting is invalid; the message says what would be valid."""


class MissingDataError(ConfigurationError, FileNotFoundError):
    """Data files or an offline package are missing or corrupt; the message says how to get them."""
