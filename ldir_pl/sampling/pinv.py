"""The physics' fast pseudo-inverse as a baseline: FBP for CT, the closed form or a few CG steps elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldir_pl.physics import LinearPhysics


class PseudoInverse:
    """``physics.A_dagger(y)`` clipped to [0, 1] like every other method, so metrics compare like with like.
    ``sampler=fbp`` reports it as ``fbp`` (CT), ``sampler=pinv`` as ``pinv``."""

    def __init__(self, name: str) -> None:
        self.name = str(name)

    @torch.no_grad()
    def reconstruct(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str] | None = None) -> Tensor:
        physics.check(y, f"{self.name} input")
        x = physics.A_dagger(y)
        return x.clamp(0, 1)
