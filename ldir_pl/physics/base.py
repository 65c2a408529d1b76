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

from ldir_pl.physics.noise import GaussianNoise, NoiseModel


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


class LinearPhysics(nn.Module):
    """Base class: subclasses implement ``A``, ``A_adjoint`` and ``label`` (and ``meas_shape`` unless it is the image's)."""

    kind = "linear"

    def __init__(self, image_size: int, noise: NoiseModel | None, seed: int = 0, dagger_iters: int = 10) -> None:
        super().__init__()
        if int(image_size) < 8:
            raise ValueError(f"physics.image_size={image_size}: need at least 8 pixels")
        self.image_size, self.seed = int(image_size), int(seed)
        self.noise = noise if noise is not None else GaussianNoise(relative=0.01)  # conf/physics/noise/gaussian
        self.dagger_iters = int(dagger_iters)

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
        b = self.A_adjoint(y)
        x, r = torch.zeros_like(b), b.clone()
        p, rs = r.clone(), _dot(r, r)
        for _ in range(self.dagger_iters):
            ap = self.A_adjoint(self.A(p))
            alpha = rs / _dot(p, ap).clamp_min(1e-30)
            x, r = x + alpha * p, r - alpha * ap
            rs_new = _dot(r, r)
            p, rs = r + (rs_new / rs.clamp_min(1e-30)) * p, rs_new
        return x

    def weights(self) -> tuple[float, float, tuple[float, float]]:
        """(image cell area, measurement cell area, image cell sides) on the [-1, 1]^2 field."""
        h = 2.0 / self.image_size
        return h * h, h * h, (h, h)

    def key(self) -> str:
        """Identifies the operator (not the noise) for caches of norms and solvers."""
        return repr(sorted((k, str(v)) for k, v in self.describe().items() if k != "noise"))

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def measure(self, x: Tensor, ids: Sequence[int | str]) -> Tensor:
        """Noisy measurements of clean images; ``ids`` fix each image's noise whatever the batch."""
        if len(ids) != x.shape[0]:
            raise ValueError(f"measure: {len(ids)} image ids for a batch of {x.shape[0]}")
        return self.noise(self.A(x), ids, self.seed)

    def check(self, y: Tensor, source: str = "measurement") -> None:
        """Clear error before any work when ``y`` cannot come from this operator (shape, NaN/inf)."""
        self._check_measurement_shape(y, source)
        if not torch.isfinite(y).all():
            raise ValueError(f"{source}: measurement holds {int((~torch.isfinite(y)).sum())} NaN/inf values")

    def _check_measurement_shape(self, y: Tensor, source: str = "measurement") -> None:
        """Shape only: cheap enough for every operator call inside an iterative solver (no device sync)."""
        expected = tuple(self.meas_shape)
        if y.ndim < len(expected) or tuple(y.shape[-len(expected):]) != expected:
            raise ValueError(f"{source}: measurement shape {tuple(y.shape)} does not match the physics "
                             f"({self.label}): expected (..., {', '.join(map(str, expected))})")

    def _check_image(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != self.image_shape:
            raise ValueError(f"image of shape {tuple(x.shape)} does not match the physics ({self.label}): "
                             f"expected (B, 1, {self.image_size}, {self.image_size})")

    def describe(self) -> dict:
        return {"kind": self.kind, "image_size": self.image_size, "noise": self.noise.describe()}
