"""What a user sees when a command meets bad input: one line on stderr naming the file or setting, exit 2.

Bad input is an ``ldir_pl.errors.InputError``, a Hydra / OmegaConf config error (unknown group, missing
key, bad override), or a config that cannot build its object (a constructor refusing a value, a key the
target does not take). Anything else is a bug and keeps its traceback; ``HYDRA_FULL_ERROR=1`` keeps it for
input errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from ldir_pl.errors import InputError

_HYDRA_DIR = Path(hydra.__file__).resolve().parent


def root_cause(err: BaseException) -> BaseException:
    """The error behind Hydra's ``InstantiationException`` wrappers (raised in a ``_target_``'s constructor)."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _raised_by_hydra(err: BaseException) -> bool:
    """True when the innermost frame is Hydra's own: the config's keys do not fit the target's signature (a
    mistyped key) or the ``_target_`` does not exist, rather than a bug inside the target."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _HYDRA_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def is_input_error(err: BaseException) -> bool:
    cause = root_cause(err)
    if isinstance(cause, (InputError, OmegaConfBaseException)):
        return True
    if isinstance(cause, HydraException) and not isinstance(cause, InstantiationException):
        return True  # config composition: unknown group option, bad override
    if cause is not err:  # building an object from the config failed: a refused value, or keys / a _target_
        return isinstance(cause, ValueError) or _raised_by_hydra(cause)  # that do not fit
    return False


@contextmanager
def user_errors(app: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:  # noqa: BLE001 - sorted below: input errors end the run, anything else propagates
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_input_error(err):
            raise
        message = " ".join(str(root_cause(err)).split())
        print(f"{app}: error: {message} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
