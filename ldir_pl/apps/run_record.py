"""``OUT/run_info.json``: what a run is and how it ended, so that nobody mistakes a failed or interrupted run, or
the leftovers of an earlier one, for finished results.

A command claims its output folder first: a folder that holds another run's outputs is refused (one line) unless
``overwrite=true``, which clears it. The record then says ``running`` until the command ends ``complete``,
``failed`` (with the error line) or ``interrupted`` (with the signal). The configs Hydra would write go to
``OUT/.hydra/`` only after the claim, so a refused run overwrites nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldir_pl.atomic import remove_partials, write_json
from ldir_pl.errors import ConfigError

INFO_FILE = "run_info.json"
STATUSES = ("running", "complete", "failed", "interrupted")


def is_rank_zero() -> bool:
    """The launching process (not a DDP worker started by Lightning), which alone owns the output folder."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _hydra_log() -> Path | None:
    """The log file Hydra opened for this job (it is kept when the folder is cleared)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir) / f"{hc.job.name}.log"


def earlier_outputs(out: Path) -> list[Path]:
    """Everything in ``out`` but this job's own Hydra log: what an earlier run left."""
    own = _hydra_log()
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if own is None or p.resolve() != own.resolve())


class RunRecord:
    """The status file of one command run in ``out`` (written on rank zero only)."""

    def __init__(self, out: str | Path, command: str) -> None:
        self.out = Path(out)
        self.command = command
        self.info: dict[str, Any] = {}
        self.active = is_rank_zero()
        self.claimed = False  # a refused claim writes nothing: the earlier run's record stays as it was

    def claim(self, overwrite: bool, earlier: Callable[[Path], list[Path]] = earlier_outputs) -> None:
        """Refuse a folder holding another run's outputs (``earlier`` lists them) unless ``overwrite``, which
        clears them; then write the record as ``running``."""
        if not self.active:
            return
        found = earlier(self.out)
        if found and not overwrite:
            names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
            raise ConfigError(f"output_dir={self.out} holds the outputs of an earlier run ({names}): choose another "
                              "output_dir, or set overwrite=true to clear it first")
        for p in found:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        log = _hydra_log()
        if found and log is not None and log.exists():
            log.write_text("")  # the handler appends: this run's log starts empty
        self.out.mkdir(parents=True, exist_ok=True)
        remove_partials(self.out)
        self.claimed = True
        self.update(command=self.command, status="running", argv=sys.argv[1:], started=_now(), pid=os.getpid())

    def save_config(self, cfg: Any) -> None:
        """``OUT/.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml``, as Hydra writes them."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        if not self.active:
            return
        folder = self.out / ".hydra"
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, folder / "config.yaml", resolve=False)
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            OmegaConf.save(hc.overrides.task, folder / "overrides.yaml")
            OmegaConf.save(OmegaConf.create({"hydra": hc}), folder / "hydra.yaml")

    def update(self, **fields: Any) -> None:
        if not (self.active and self.claimed):
            return
        self.info.update(fields)
        write_json(self.out / INFO_FILE, self.info)

    def finish(self, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} not in {STATUSES}")
        fields: dict[str, Any] = {"status": status, "finished": _now()}
        if error:
            fields["error"] = error
        self.update(**fields)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["INFO_FILE", "RunRecord", "earlier_outputs", "is_rank_zero"]
