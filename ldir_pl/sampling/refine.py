"""The sampler's last step: its decoded image ``x_s`` taken onto the data by TV pulled towards it,

    min_x  ||A x - y||^2 + w TV(x) + lam ||A||^2 ||x - x_s||^2   over [0, 1],

by PDHG from ``x_s`` (``TVReconstructor.anchored``). ``lam = 0`` is the TV problem alone (the same minimiser
as the TV baseline, whatever the start); a large ``lam`` returns ``x_s``. In between it is a MAP estimate
with two priors: TV for edges and flat regions, a Gaussian centred on the diffusion sample for the
structures the few measurements leave open.
"""

from __future__ import annotations

from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics import LinearPhysics
from ldir_pl.sampling.tv import TVReconstructor


class AnchoredTV:
    """``AnchoredTV(tv, lam)(x_s, y, physics)``; ``tv`` is the TV problem of ``sampler=tv`` (weight, stopping)."""

    def __init__(self, tv: TVReconstructor, lam: float) -> None:
        if lam < 0:
            raise ConfigError(f"sampler.refine.lam={lam}: must be >= 0")
        self.tv, self.lam = tv, float(lam)

    def __call__(self, x: Tensor, y: Tensor, physics: LinearPhysics) -> Tensor:
        return self.tv.anchored(y.detach().float(), x.detach().float(), physics, self.lam).x


__all__ = ["AnchoredTV"]
