"""Deblurring: ``A x = k * x`` with a Gaussian or given kernel, circular or zero boundary."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics.base import LinearPhysics
from ldir_pl.physics.noise import NoiseModel

BOUNDARIES = ("circular", "zero")


def gaussian_kernel(sigma: float) -> Tensor:
    """Normalised 2-D Gaussian, (2r+1)^2 with r = ceil(3 sigma)."""
    r = max(1, math.ceil(3 * float(sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    k = torch.outer(g, g)
    return (k / k.sum()).float()


class Blur(LinearPhysics):
    """Convolution with an odd-sized kernel; the output has the image's size.

    Args:
        sigma: Gaussian kernel width in pixels (ignored when ``kernel`` is given).
        kernel: explicit kernel (odd sides), e.g. a motion-blur line; used as given (not normalised).
        boundary: ``circular`` (periodic image) or ``zero`` (zero outside the field).
    """

    family = "blur"

    def __init__(self, *, image_size: int, noise: NoiseModel, sigma: float | None = None,
                 kernel: Sequence[Sequence[float]] | None = None, boundary: str = "circular", seed: int = 0,
                 dagger_iters: int = 10) -> None:
        super().__init__(image_size, noise, seed, dagger_iters)
        if boundary not in BOUNDARIES:
            raise ConfigError(f"physics.boundary={boundary!r}: expected one of {BOUNDARIES}")
        if kernel is None:
            if sigma is None or float(sigma) <= 0:
                raise ConfigError(f"physics.sigma={sigma}: must be positive")
            k = gaussian_kernel(sigma)
        else:
            k = torch.as_tensor(kernel, dtype=torch.float32)
            if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
                raise ConfigError(f"physics.kernel of shape {tuple(k.shape)}: expected a 2-D kernel with odd sides")
        if max(k.shape) > self.image_size:
            raise ConfigError(f"physics: a {tuple(k.shape)} kernel does not fit a {self.image_size}px image")
        self.sigma = None if kernel is not None else float(sigma)
        self.boundary = boundary
        self.register_buffer("kernel", k[None, None], persistent=False)

    @property
    def label(self) -> str:
        what = f"Gaussian blur sigma {self.sigma:g} px" if self.sigma is not None else \
            f"{self.kernel.shape[-2]}x{self.kernel.shape[-1]} kernel blur"
        return f"{what}, {self.boundary} boundary"

    def _conv(self, x: Tensor, k: Tensor) -> Tensor:
        ph, pw = k.shape[-2] // 2, k.shape[-1] // 2
        k = k.to(x.device, x.dtype)
        if self.boundary == "circular":
            return F.conv2d(F.pad(x, (pw, pw, ph, ph), mode="circular"), k)
        return F.conv2d(x, k, padding=(ph, pw))

    def A(self, x: Tensor) -> Tensor:
        self._check_image(x)
        return self._conv(x, self.kernel)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check_measurement_shape(y, "adjoint input")
        return self._conv(y, self.kernel.flip(-1, -2))  # correlation with the flipped kernel: the transpose

    def describe(self) -> dict:
        return {**super().describe(), "sigma": self.sigma, "kernel_shape": list(self.kernel.shape[-2:]),
                "boundary": self.boundary}
