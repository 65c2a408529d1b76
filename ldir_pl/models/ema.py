"""Exponential moving average of a network's weights (the weights that get sampled and exported)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ldir_pl.errors import ConfigError


class EMA(nn.Module):
    """Holds a frozen copy of ``model`` updated as ``ema = d * ema + (1 - d) * model``.

    It is an ``nn.Module`` so the averaged weights live in the LightningModule's ``state_dict``
    (checkpointed and resumed for free). The decay warms up as ``(1 + n) / (10 + n)`` so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"ema decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - d)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:  # the averaged copy is always in eval mode
        super().train(mode)
        self.module.eval()
        return self
