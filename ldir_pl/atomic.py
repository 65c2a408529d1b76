"""Outputs that are whole or absent: every file is written under a temporary name beside its final one and
renamed into place when complete, so a crash, a kill or a full disk never leaves a truncated file (a ``.nii.gz``,
a ``summary.json``) that looks finished.

The temporary name keeps the final suffix (``.partial-<pid>-summary.json``) because writers such as ``np.save``,
``nib.save``, PIL and matplotlib choose the format from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_PREFIX = ".partial-"


def _partial(path: Path) -> Path:
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; it replaces the folder ``path`` (and what was there) only if the block
    succeeds (a prior bundle, a DICOM series)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_partials(folder: str | Path) -> None:
    """Remove temporary files a killed process (SIGKILL: no cleanup ran) left anywhere under ``folder``."""
    for p in sorted(Path(folder).rglob(f"{PARTIAL_PREFIX}*"), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


__all__ = ["atomic_dir", "atomic_path", "remove_partials", "write_json", "write_text"]
