"""Stop training on a NaN/inf loss *before* the bad step updates the weights."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


class NonFiniteLossError(RuntimeError):
    """Raised by :class:`NaNGuard`; the message names the step and the last good checkpoint."""


class NaNGuard(pl.Callback):
    """Raise :class:`NonFiniteLossError` when the training loss is NaN/inf.

    It checks in ``on_before_backward``, so the optimiser never applies the bad step and no later
    checkpoint overwrites ``last.ckpt``: the last saved checkpoint is the last good state.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        ckpts = [
            cb.last_model_path or cb.best_model_path
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path)
        ]
        where = ckpts[0] if ckpts else "none saved yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({value}) at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}) in "
            f"{type(pl_module).__name__}; training stopped, last good checkpoint: {where}"
        )
