"""What every training stage of the prior shares: the optimiser and the checkpoint's kind tag."""

from __future__ import annotations

from collections.abc import Iterator

import pytorch_lightning as pl
from torch import nn

from .schedules import adamw_warmup_cosine

#: checkpoint key naming the stage that wrote it, so a checkpoint of the wrong kind is refused up front
CKPT_KIND_KEY = "ldir_kind"


class PriorTrainingModule(pl.LightningModule):
    """AdamW with linear warmup and cosine decay (hparams ``lr``, ``weight_decay``, ``warmup_steps``,
    ``min_lr_ratio``) over ``trained_parameters()``; checkpoints carry ``kind``."""

    kind = "prior"

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def configure_optimizers(self):
        return adamw_warmup_cosine(
            self.trained_parameters(),
            lr=self.hparams.lr,
            total_steps=self.trainer.estimated_stepping_batches,
            warmup_steps=self.hparams.warmup_steps,
            weight_decay=self.hparams.weight_decay,
            min_lr_ratio=self.hparams.min_lr_ratio,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KIND_KEY] = self.kind
