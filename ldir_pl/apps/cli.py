"""What a user sees when a command meets bad input or a signal, and what the run folder says afterwards.

- Bad input ends with one line on stderr naming the file or setting, and exit status 2: an
  ``ldir_pl.errors.InputError``, a Hydra / OmegaConf config error (unknown group option, mistyped key, bad
  override), a config that cannot build its object (a constructor refusing a value, a key the target does not
  take), or an output folder that cannot be written. Anything else is a bug and keeps its traceback;
  ``HYDRA_FULL_ERROR=1`` keeps it for input errors too.
- SIGTERM / SIGINT stop the run at its next step (``ldir_pl.interrupt``); it exits with 143 / 130.
- ``OUT/run_info.json`` says ``running``, then ``complete``, ``failed`` (with the error line, also written to the
  run's log) or ``interrupted`` (``run_record.py``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException, InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

from ldir_pl import interrupt
from ldir_pl.apps.run_record import RunRecord, earlier_outputs
from ldir_pl.config import register_resolvers, require_conf_dir
from ldir_pl.errors import InputError
from ldir_pl.interrupt import Interrupted, stop_on_signals

log = logging.getLogger(__name__)

_HYDRA_DIR = Path(hydra.__file__).resolve().parent
_IN_APP = False  # inside run_hydra_app, which sets HYDRA_FULL_ERROR for Hydra itself ...
_USER_FULL_ERROR = False  # ... and keeps what the user had set
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def root_cause(err: BaseException) -> BaseException:
    """The error behind Hydra's ``InstantiationException`` wrappers (raised in a ``_target_``'s constructor)."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _frames(err: BaseException) -> list[Path]:
    out, tb = [], err.__traceback__
    while tb is not None:
        out.append(Path(tb.tb_frame.f_code.co_filename).resolve())
        tb = tb.tb_next
    return out


def _raised_by_hydra(err: BaseException) -> bool:
    """True when the innermost frame is Hydra's own: the config's keys do not fit the target's signature (a
    mistyped key) or the ``_target_`` does not exist, rather than a bug inside the target."""
    frames = _frames(err)
    return bool(frames) and _HYDRA_DIR in frames[-1].parents


def _bad_arguments(err: BaseException) -> bool:
    """A constructor called with keys it does not take (``+data.max_image=1`` reaching ``**kwargs``)."""
    return isinstance(err, TypeError) and bool(re.search(r"unexpected keyword argument|required (keyword|positional)"
                                                         r" argument", str(err)))


def _output_folder_error(err: BaseException) -> bool:
    """An OS error while Hydra prepared the run folder (``/proc/x``, a path under a file, a read-only mount): it
    passed through Hydra's ``run_job`` and no frame of this package ran after it."""
    if not isinstance(err, OSError):
        return False
    names, tb = [], err.__traceback__
    while tb is not None:
        names.append((tb.tb_frame.f_code.co_name, Path(tb.tb_frame.f_code.co_filename).resolve()))
        tb = tb.tb_next
    starts = [i for i, (name, path) in enumerate(names) if name == "run_job" and _HYDRA_DIR in path.parents]
    return bool(starts) and not any(_PACKAGE_DIR in path.parents for _, path in names[starts[-1]:])


def is_input_error(err: BaseException) -> bool:
    cause = root_cause(err)
    if isinstance(cause, (InputError, OmegaConfBaseException, MisconfigurationException)):
        return True  # MisconfigurationException: Lightning refusing a setting (e.g. max_epochs below a checkpoint's)
    if isinstance(cause, HydraException) and not isinstance(cause, InstantiationException):
        return True  # config composition: unknown group option, bad override
    if _output_folder_error(cause):
        return True
    if cause is not err:  # building an object from the config failed: a refused value, or keys / a _target_
        return isinstance(cause, ValueError) or _raised_by_hydra(cause) or _bad_arguments(cause)
    return False


def _full_key(err: BaseException) -> str | None:
    """The config key Hydra was building when ``err`` happened (its ``full_key: ...`` line)."""
    while err is not None:
        found = re.search(r"full_key:\s*(\S+)", str(err))
        if found:
            return found.group(1)
        err = err.__cause__
    return None


def error_line(err: BaseException) -> str:
    """One line naming the setting or file at fault."""
    cause = root_cause(err)
    if _output_folder_error(cause):
        return f"output folder {cause.filename}: cannot be written ({cause.strerror or type(cause).__name__})"
    message = " ".join(str(cause).split())
    key = _full_key(err)
    if cause is not err and key and _bad_arguments(cause):
        bad = re.search(r"argument '(\w+)'", message)
        return (f"{key}.{bad.group(1)}: not a setting of {key} ({message})" if bad else f"{key}: {message}")
    if cause is not err and key and key not in message and not isinstance(cause, InputError):
        return f"{key}: {message}"  # an input error names its file or setting already
    return message


def _to_log_files(level: int, message: str, exc_info: bool = False) -> None:
    """Write ``message`` to the run's log file(s) only: the terminal already gets the one line (or traceback)."""
    record = logging.getLogger(__name__).makeRecord(__name__, level, __file__, 0, message, (),
                                                    sys.exc_info() if exc_info else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fail(app: str, line: str, code: int) -> None:
    print(f"{app}: error: {line} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
    sys.exit(code)


@contextmanager
def command_run(app: str, output_dir: str | Path | None = None, cfg: Any = None, overwrite: bool = False,
                earlier: Callable[[Path], list[Path]] = earlier_outputs) -> Iterator[RunRecord | None]:
    """Run a command's body: claim ``output_dir`` (see ``RunRecord``), save ``cfg`` there, stop on signals, and
    end with the right status, log line and exit code."""
    record = RunRecord(output_dir, app) if output_dir is not None else None
    full = _USER_FULL_ERROR if _IN_APP else os.environ.get("HYDRA_FULL_ERROR") == "1"
    with stop_on_signals():
        try:
            if record is not None:
                record.claim(overwrite, earlier)
                if cfg is not None:
                    record.save_config(cfg)
            yield record
        except (Interrupted, KeyboardInterrupt, SystemExit) as err:
            # Lightning meets the same SIGTERM at its own checks and leaves by SystemExit (status 0): while a stop
            # is requested that exit is this interrupt too
            if isinstance(err, SystemExit) and interrupt.requested() is None:
                raise
            stop = err if isinstance(err, Interrupted) else Interrupted(interrupt.requested() or signal.SIGINT)
            _to_log_files(logging.WARNING, f"{app}: {stop}; what was complete is kept")
            if record is not None:
                record.finish("interrupted", str(stop))
            where = f" in {record.out}" if record is not None else ""
            print(f"{app}: {stop}; what was complete is kept{where}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)
        except Exception as err:  # noqa: BLE001 - sorted below: input errors end the run, anything else propagates
            if not is_input_error(err):
                _to_log_files(logging.ERROR, f"{app} failed", exc_info=True)
                if record is not None:
                    record.finish("failed", f"{type(err).__name__}: {' '.join(str(err).split())}")
                raise
            line = error_line(err)
            _to_log_files(logging.ERROR, f"{app}: error: {line}")
            if record is not None:
                record.finish("failed", line)
            if full:
                raise
            _fail(app, line, 2)
        else:
            if record is not None:
                record.finish("complete")


def user_errors(app: str):
    """Input errors as one line and exit 2, without a run folder (the library's small entry points)."""
    return command_run(app)


def run_hydra_app(app: str, hydra_main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function so that errors Hydra meets before the command runs (an unknown group
    option, a mistyped key, an output folder that cannot be made) also end with one line and exit 2."""
    global _IN_APP, _USER_FULL_ERROR
    user_full = _USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _IN_APP = True
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own multi-line report
    try:
        register_resolvers()
        require_conf_dir()
        return hydra_main()
    except Exception as err:  # noqa: BLE001 - input errors become one line; bugs keep their traceback
        if user_full or not is_input_error(err):
            raise
        _fail(app, error_line(err), 2)
    finally:
        _IN_APP = False
        if not user_full:
            os.environ.pop("HYDRA_FULL_ERROR", None)


__all__ = ["command_run", "error_line", "is_input_error", "root_cause", "run_hydra_app", "user_errors"]
