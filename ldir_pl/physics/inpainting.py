"""Inpainting: ``A x = m . x`` for a fixed 0/1 mask (random pixels or a box), seeded."""

from __future__ import annotations

import torch
from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics.base import LinearPhysics
from ldir_pl.physics.noise import NoiseModel

MASKS = ("random", "box")


class Inpainting(LinearPhysics):
    """Keeps the pixels where the mask is 1; the measurement has the image's shape (zeros where missing).

    Args:
        mask: ``random`` (each pixel missing with probability ``missing``) or ``box`` (a centred square
            covering the fraction ``missing`` of the image).
        missing: fraction of pixels not measured.
        mask_seed: seed of the random mask (one mask for every image, like a fixed detector defect).
    """

    family = "inpainting"

    def __init__(self, *, image_size: int, missing: float, noise: NoiseModel, mask: str = "random",
                 mask_seed: int = 0, seed: int = 0) -> None:
        super().__init__(image_size, noise, seed)
        if mask not in MASKS:
            raise ConfigError(f"physics.mask={mask!r}: expected one of {MASKS}")
        if not 0.0 <= float(missing) < 1.0:
            raise ConfigError(f"physics.missing={missing}: expected a fraction in [0, 1)")
        n = self.image_size
        if mask == "random":
            gen = torch.Generator().manual_seed(int(mask_seed))
            m = (torch.rand(n, n, generator=gen) >= float(missing)).float()
        else:
            side = round(n * float(missing) ** 0.5)
            m = torch.ones(n, n)
            lo = (n - side) // 2
            m[lo:lo + side, lo:lo + side] = 0.0
        self.mask_kind, self.missing, self.mask_seed = mask, float(missing), int(mask_seed)
        self.register_buffer("mask", m[None, None], persistent=False)

    @property
    def label(self) -> str:
        return f"inpainting, {self.mask_kind} mask, {100 * self.missing:.0f}% missing"

    def A(self, x: Tensor) -> Tensor:
        self._check_image(x)
        return x * self.mask.to(x.device, x.dtype)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check_measurement_shape(y, "adjoint input")
        return y * self.mask.to(y.device, y.dtype)

    @torch.no_grad()
    def A_dagger(self, y: Tensor) -> Tensor:
        """The mask is a projection: it is its own pseudo-inverse."""
        return self.A_adjoint(y)

    def describe(self) -> dict:
        return {**super().describe(), "mask": self.mask_kind, "missing": self.missing, "mask_seed": self.mask_seed}
