"""Warm start of guided sampling (SDEdit / come-closer-diffuse-faster): a classical reconstruction, encoded and
noised to the timestep ``strength * T``, so the prior removes its artefacts instead of inventing the anatomy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics import LinearPhysics
from ldir_pl.sampling.base import Reconstructor


class WarmStart:
    """``source``: the reconstruction to start from (``sampler=fbp`` or ``sampler=tv``); ``strength`` in (0, 1]."""

    def __init__(self, source: Reconstructor, strength: float) -> None:
        if not 0.0 < float(strength) <= 1.0:
            raise ConfigError(f"sampler.init.strength={strength}: expected a value in (0, 1]")
        self.source, self.strength = source, float(strength)

    @torch.no_grad()
    def image(self, y: Tensor, physics: LinearPhysics, ids: Sequence) -> Tensor:
        return self.source.reconstruct(y, physics, list(ids)).to(y.device)
