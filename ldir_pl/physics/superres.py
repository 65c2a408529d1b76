"""Super-resolution: ``A x`` = the mean over each ``factor x factor`` block (area downsampling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics.base import LinearPhysics
from ldir_pl.physics.noise import NoiseModel


class SuperResolution(LinearPhysics):
    """(B,1,N,N) -> (B,1,N/f,N/f). A A^T = I / f^2, so the pseudo-inverse f^2 A^T is nearest upsampling."""

    family = "superres"

    def __init__(self, *, image_size: int, factor: int, noise: NoiseModel, seed: int = 0) -> None:
        super().__init__(image_size, noise, seed)
        if int(factor) < 2 or self.image_size % int(factor):
            raise ConfigError(f"physics.factor={factor}: need an integer >= 2 dividing image_size={image_size}")
        self.factor = int(factor)

    @property
    def meas_shape(self) -> tuple[int, int]:
        return (self.image_size // self.factor,) * 2

    @property
    def label(self) -> str:
        return f"super-resolution x{self.factor}"

    def A(self, x: Tensor) -> Tensor:
        self._check_image(x)
        return F.avg_pool2d(x, self.factor)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check_measurement_shape(y, "adjoint input")
        f = self.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / (f * f)

    @torch.no_grad()
    def A_dagger(self, y: Tensor) -> Tensor:
        return self.factor**2 * self.A_adjoint(y)

    def weights(self) -> tuple[float, float, tuple[float, float]]:
        h = 2.0 / self.image_size
        return h * h, (self.factor * h) ** 2, (h, h)

    def describe(self) -> dict:
        return {**super().describe(), "factor": self.factor}
