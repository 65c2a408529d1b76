"""Undo what trial optimizer steps change: weights, optimizer, scheduler, AMP scaler and RNG state.

Plain ``state_dict``s, not a Lightning checkpoint: ``trainer.save_checkpoint`` writes a file and the
checkpoint connector's dump/restore also carries loops, callbacks and loggers, none of which a trial
touches. Every object here has a public ``state_dict``/``load_state_dict`` that restores in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.utilities.seed import isolate_rng


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)  # host copy: the snapshot must not take the device memory trials need


@contextmanager
def restored_on_exit(trainer: pl.Trainer) -> Iterator[None]:
    """Snapshot the trainer's module, optimizers, schedulers, precision plugin and the global RNGs; restore
    them on exit (the RNGs only on a normal exit: ``isolate_rng`` does not restore on an exception, after
    which fit fails anyway)."""
    module = trainer.lightning_module
    model = apply_to_collection(module.state_dict(), torch.Tensor, _cpu_copy)
    optimizers = [apply_to_collection(o.state_dict(), torch.Tensor, _cpu_copy) for o in trainer.optimizers]
    schedulers = [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]
    precision = copy.deepcopy(trainer.precision_plugin.state_dict())
    with isolate_rng():
        try:
            yield
        finally:
            module.load_state_dict(model)
            for opt, state in zip(trainer.optimizers, optimizers):
                opt.load_state_dict(state)
                opt.zero_grad(set_to_none=True)
            for config, state in zip(trainer.lr_scheduler_configs, schedulers):
                config.scheduler.load_state_dict(state)
            trainer.precision_plugin.load_state_dict(precision)
