"""The errors a user's input causes: a file, folder or setting that cannot work, named in the message.

Commands print these as one line and exit 2; anything else is a bug and keeps its traceback. Each is also
the built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``), so library users can
catch either.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user; the message names the file, shape or setting at fault."""


class ConfigError(InputError, ValueError):
    """A setting (a config key, an argument) that cannot work."""


class DataError(InputError, ValueError):
    """A data file or folder whose content cannot be used."""


class MissingPathError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def as_int(value: object, setting: str) -> int:
    """``value`` as a whole number, or a ``ConfigError`` naming ``setting`` (``physics.num_views=abc``)."""
    try:
        number = float(value)  # type: ignore[arg-type]
        if isinstance(value, bool) or number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{setting}={value!r}: expected a whole number") from None


__all__ = ["ConfigError", "DataError", "InputError", "MissingPathError", "as_int"]
