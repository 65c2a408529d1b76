"""Pixel-space DPS (Chung et al., ICLR 2023) with a pixel DDPM prior.

The same guided DDIM loop as :class:`LDIRSampler`, run in image space (network space 2x - 1): the
gradient of ||y - A x0_hat(x_t)||_2 (not squared, i.e. DPS's ``zeta / ||y - A x0_hat||`` normalisation)
is taken through the pixel UNet with respect to x_t and a plain SGD step is applied after each ancestral
(eta = 1) DDIM step. x0_hat is clamped to [-1, 1] as in DPS.
"""

from __future__ import annotations

from typing import Any

from ldir_pl.sampling.ldir import LDIRSampler


class PixelDPSSampler(LDIRSampler):
    """DPS with a pixel prior; constructor arguments as :class:`LDIRSampler` with DPS defaults."""

    expected_kind = "pixel"

    def __init__(
        self,
        prior: Any,
        num_steps: int = 100,
        eta: float = 1.0,
        lr: float = 1.0,
        step_schedule: str = "constant",
        optimizer: str = "sgd",
        grad_wrt: str = "zt",
        p: int = 2,
        squared: bool = False,
        normalize: bool = False,
        clamp_z0: float | None = 1.0,
        refine: str = "none",
        refine_iters: int = 0,
        refine_lam: float = 0.0,
        name: str = "pixel_dps",
        **kwargs: Any,
    ) -> None:
        super().__init__(prior, num_steps=num_steps, eta=eta, lr=lr, step_schedule=step_schedule,
                         optimizer=optimizer, grad_wrt=grad_wrt, p=p, squared=squared, normalize=normalize,
                         clamp_z0=clamp_z0, refine=refine, refine_iters=refine_iters, refine_lam=refine_lam,
                         name=name, **kwargs)


__all__ = ["PixelDPSSampler"]
