"""The contract every measurement model meets: ``y = noise(A x)`` for a linear ``A`` between batches of
1-channel images (B,1,H,W) and measurements (B,1,*meas_shape).

``A``, ``A_adjoint`` (the exact transpose, so autograd's backward of one is the other), ``A_dagger`` (a fast
pseudo-inverse: FBP for CT, closed forms where they exist, a few CG steps otherwise), ``measure`` (clean
measurement plus noise seeded by each image's id), ``check`` (a clear error before any work when data cannot
belong to this operator) and ``weights`` (cell sizes that make norms integrals, for TV). Reconstructors use
nothing else, so every method runs on every operator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ldir_pl.errors import ConfigError
from ldir_pl.physics.linalg import conjugate_gradient, power_iteration
from ldir_pl.physics.noise import NoiseModel


class LinearPhysics(nn.Module):
    """Base class: subclasses implement ``A``, ``A_adjoint`` and ``label`` (and ``meas_shape`` unless it is the image's)."""

    family = "linear"

    def __init__(self, image_size: int, noise: NoiseModel, seed: int = 0, dagger_iters: int = 10) -> None:
        super().__init__()
        if int(image_size) < 8:
            raise ConfigError(f"physics.image_size={image_size}: need at least 8 pixels")
        if not isinstance(noise, NoiseModel):
            raise ConfigError(f"physics.noise: expected a noise model (physics/noise=gaussian|poisson|none), got "
                              f"{type(noise).__name__}")
        self.image_size, self.seed = int(image_size), int(seed)
        self.noise = noise
        self.dagger_iters = int(dagger_iters)
        self._norm_sq: float | None = None

    # ------------------------------------------------------------------ the operator
    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def meas_shape(self) -> tuple[int, ...]:
        """The image's shape for image-to-image operators (blur, inpainting); others override it."""
        return self.image_shape

    @property
    def label(self) -> str:
        """One line for tables and plot titles."""
        raise NotImplementedError

    def A(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    @torch.no_grad()
    def A_dagger(self, y: Tensor) -> Tensor:
        """Least-squares solution by ``dagger_iters`` CG steps on A^T A x = A^T y from zero."""
        return conjugate_gradient(self.A_normal, self.A_adjoint(y), iters=self.dagger_iters)

    def A_normal(self, x: Tensor) -> Tensor:
        """A^T A x."""
        return self.A_adjoint(self.A(x))

    def compute_norm(self) -> float:
        """||A||^2, the largest eigenvalue of A^T A (power iteration), computed once and kept on the object:
        step sizes and relative weights of every solver are scaled by it."""
        if self._norm_sq is None:
            device = next((b.device for b in self.buffers()), torch.device("cpu"))
            self._norm_sq = power_iteration(self.A_normal, (1, *self.image_shape), device=device)
        return self._norm_sq

    def weights(self) -> tuple[float, float, tuple[float, float]]:
        """(image cell area, measurement cell area, image cell sides) on the [-1, 1]^2 field."""
        h = 2.0 / self.image_size
        return h * h, h * h, (h, h)

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def measure(self, x: Tensor, ids: Sequence[int | str]) -> Tensor:
        """Noisy measurements of clean images; ``ids`` fix each image's noise whatever the batch."""
        if len(ids) != x.shape[0]:
            raise ConfigError(f"measure: {len(ids)} image ids for a batch of {x.shape[0]}")
        return self.noise(self.A(x), ids, self.seed)

    def check(self, y: Tensor, source: str = "measurement") -> None:
        """Clear error before any work when ``y`` cannot come from this operator (shape, NaN/inf)."""
        self._check_measurement_shape(y, source)
        if not torch.isfinite(y).all():
            raise ConfigError(f"{source}: measurement holds {int((~torch.isfinite(y)).sum())} NaN/inf values")

    def _check_measurement_shape(self, y: Tensor, source: str = "measurement") -> None:
        """Shape only: cheap enough for every operator call inside an iterative solver (no device sync)."""
        expected = tuple(self.meas_shape)
        if y.ndim < len(expected) or tuple(y.shape[-len(expected):]) != expected:
            raise ConfigError(f"{source}: measurement shape {tuple(y.shape)} does not match the physics "
                             f"({self.label}): expected (..., {', '.join(map(str, expected))})")

    def _check_image(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != self.image_shape:
            raise ConfigError(f"image of shape {tuple(x.shape)} does not match the physics ({self.label}): "
                             f"expected (B, 1, {self.image_size}, {self.image_size})")

    def describe(self) -> dict:
        return {"family": self.family, "image_size": self.image_size, "noise": self.noise.describe()}
