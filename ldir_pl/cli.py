"""What a user sees when a command meets bad input: one line on stderr naming the file or setting, exit 2.

``HYDRA_FULL_ERROR=1`` keeps the full traceback for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf.errors import OmegaConfBaseException

# errors a bad file, folder or setting produces (the project raises these with the culprit named)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, TypeError, OmegaConfBaseException)


def root_cause(err: BaseException) -> BaseException:
    """The error behind Hydra's ``InstantiationException`` wrappers (raised in a ``_target_``'s constructor)."""
    while type(err).__name__ == "InstantiationException" and err.__cause__ is not None:
        err = err.__cause__
    return err


@contextmanager
def user_errors(app: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:  # noqa: BLE001 - sorted below: user errors end the run, anything else propagates
        cause = root_cause(err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(cause, USER_ERRORS):
            raise
        message = " ".join(str(cause).split())
        print(f"{app}: error: {message} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
