"""Measurement noise models, seeded per image so an image always receives the same noise.

Each image's noise is drawn from its own ``torch.Generator`` seeded by ``(seed, image_id)``, so results do
not depend on batch composition, order or device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ldir_pl.errors import ConfigError


def image_seed(seed: int, image_id: int | str) -> int:
    """A 63-bit seed from the global seed and an image identifier (index or file name)."""
    digest = hashlib.sha256(f"{int(seed)}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _standard_normal(shape: Sequence[int], seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


class NoiseModel:
    """Base: ``__call__(clean_sino, ids, seed)`` returns the noisy sinogram (same shape)."""

    name = "none"

    def __call__(self, y: Tensor, ids: Sequence[int | str], seed: int = 0) -> Tensor:
        return y

    def describe(self) -> dict:
        return {"kind": self.name}


class NoNoise(NoiseModel):
    pass


class GaussianNoise(NoiseModel):
    """y + sigma * n with sigma = ``relative`` * RMS(clean sinogram) per image (reference protocol),
    or a fixed ``sigma`` when given."""

    name = "gaussian"

    def __init__(self, relative: float | None = None, sigma: float | None = None) -> None:
        if (relative is None) == (sigma is None):
            raise ConfigError("physics.noise: give exactly one of `relative` or `sigma`")
        if (relative is not None and relative < 0) or (sigma is not None and sigma < 0):
            raise ConfigError(f"physics.noise: negative noise level (relative={relative}, sigma={sigma})")
        self.relative, self.sigma = relative, sigma

    def __call__(self, y: Tensor, ids: Sequence[int | str], seed: int = 0) -> Tensor:
        out = torch.empty_like(y)
        for i, image_id in enumerate(ids):
            clean = y[i]
            level = self.sigma if self.sigma is not None else self.relative * clean.pow(2).mean().sqrt()
            n = _standard_normal(clean.shape, image_seed(seed, image_id)).to(y.device, y.dtype)
            out[i] = clean + level * n
        return out

    def describe(self) -> dict:
        return {"kind": self.name, "relative": self.relative, "sigma": self.sigma}


class PoissonNoise(NoiseModel):
    """LoDoPaB-CT style photon noise on post-log data.

    Counts ~ Poisson(N0 * exp(-mu * Ax)), observed y = -log(max(counts, 0.1) / N0) / mu. ``mu`` converts
    line integrals in the geometry's length unit to optical depth: LoDoPaB's mu_max = 81.35858 / m with
    the extent in metres (``physics=lodopab``), or 81.35858 x 0.13 for an extent-1 image read as 26 cm.
    """

    name = "poisson"

    def __init__(self, photons: float = 4096.0, attenuation_scale: float = 10.5766,
                 min_count: float = 0.1) -> None:
        if photons <= 0 or attenuation_scale <= 0:
            raise ConfigError(f"physics.noise: photons={photons} and attenuation_scale={attenuation_scale} "
                             "must be positive")
        self.photons, self.mu, self.min_count = float(photons), float(attenuation_scale), float(min_count)

    def __call__(self, y: Tensor, ids: Sequence[int | str], seed: int = 0) -> Tensor:
        out = torch.empty_like(y)
        for i, image_id in enumerate(ids):
            rate = (self.photons * torch.exp(-self.mu * y[i].clamp_min(0))).cpu().double()
            gen = torch.Generator().manual_seed(image_seed(seed, image_id))
            counts = torch.poisson(rate, generator=gen).clamp_min(self.min_count)
            out[i] = (-torch.log(counts / self.photons) / self.mu).to(y.device, y.dtype)
        return out

    def describe(self) -> dict:
        return {"kind": self.name, "photons": self.photons, "attenuation_scale": self.mu}
