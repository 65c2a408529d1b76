"""Warm start of guided sampling (SDEdit / come-closer-diffuse-faster): a classical reconstruction, encoded and
noised to t0 = strength * T, so the prior only removes its artefacts instead of inventing the anatomy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldir_pl.physics import LinearPhysics
from ldir_pl.sampling.pinv import PseudoInverse
from ldir_pl.sampling.tv import TVReconstructor

SOURCES = ("pinv", "tv")


class WarmStart:
    """``source``: ``pinv`` (the physics' A_dagger: FBP for CT) or ``tv``; ``strength`` in (0, 1]."""

    def __init__(self, source: str, strength: float) -> None:
        if source not in SOURCES:
            raise ValueError(f"sampler.init.source={source!r}: expected one of {SOURCES}")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"sampler.init.strength={strength}: expected a value in (0, 1]")
        self.source, self.strength = source, float(strength)
        self._recon = PseudoInverse("pinv") if source == "pinv" else TVReconstructor()

    @torch.no_grad()
    def image(self, y: Tensor, physics: LinearPhysics, ids: Sequence) -> Tensor:
        return self._recon.reconstruct(y, physics, list(ids)).to(y.device)

    def start_timestep(self, num_train_timesteps: int) -> int:
        return int(round(self.strength * (num_train_timesteps - 1)))

    def describe(self) -> dict:
        return {"source": self.source, "strength": self.strength}
