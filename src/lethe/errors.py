"""User-facing errors: one line that names the problem and the fix.

Anything raised as `LetheError` is printed by the CLIs (`lethe.cli`) as `error: <message>`
without a traceback; everything else is a bug and keeps its traceback.
"""


class LetheError(Exception):
    """Bad input from the user (config, data, checkpoint), explained in one line."""


class ConfigError(LetheError, ValueError):
    """A config value out of range or inconsistent with another."""


class DataError(LetheError):
    """A dataset that is missing, empty, undecodable or too small."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none): what a
    library's multi-line error contributes to a one-line Lethe message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0].strip() if lines else type(exc).__name__)[:limit]


def require(ok: bool, key: str, value, expected: str) -> None:
    """The one check every config value goes through: ConfigError "<key>=<value> is out of range:
    expected <expected>" unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: expected {expected}")


def is_int(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(key: str, value, minimum: int = 1) -> None:
    require(is_int(value, minimum), key, value, f"an integer >= {minimum}")


def require_positive(key: str, value) -> None:
    require(is_number(value) and value > 0, key, value, "a number > 0")
