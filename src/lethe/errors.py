"""User-facing errors: one line that names the problem and the fix.

Anything raised as `LetheError` is printed by the CLIs as `error: <message>` without a
traceback; everything else is a bug and keeps its traceback.
"""


class LetheError(Exception):
    """Bad input from the user (config, data, checkpoint), explained in one line."""


class ConfigError(LetheError, ValueError):
    """A config value out of range or inconsistent with another."""


class DataError(LetheError):
    """A dataset that is missing, empty, undecodable or too small."""
