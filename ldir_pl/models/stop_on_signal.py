"""Stop training at the next batch after SIGTERM / SIGINT, checkpoint first, so a preempted job resumes where it
stopped (``ckpt_path=last``) instead of losing the epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from ldir_pl import interrupt

log = logging.getLogger(__name__)


class StopOnSignal(pl.Callback):
    """Raise ``Interrupted`` at the first batch end after a stop request; on the way out, save the state to
    ``<dirpath>/last.ckpt``, the file ``ckpt_path=last`` resumes from."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        interrupt.check()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        interrupt.check()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # any exception while a stop is requested: this callback's check raised it, or Lightning's own SIGTERM
        # check got there first (its SystemExit)
        signum = interrupt.requested()
        if signum is None or trainer.sanity_checking or trainer.global_step == 0:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("%s: saved %s (step %d); resume with ckpt_path=last", interrupt.Interrupted(signum), path,
                    trainer.global_step)
