"""The measurement model a config describes: geometry, operator and noise in one object."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ldir_pl.physics.geometry import CTGeometry
from ldir_pl.physics.noise import GaussianNoise, NoiseModel, NoNoise
from ldir_pl.physics.ray_transform import RayTransform


class Physics(nn.Module):
    """y = noise(A x). Built by Hydra from ``conf/physics/*.yaml`` (flat keys: ``num_views``, ``kind``...)."""

    def __init__(
        self,
        kind: str = "parallel",
        num_views: int = 23,
        angle_range_deg: Sequence[float] | None = None,
        image_size: int = 256,
        extent: float = 1.0,
        det_count: int | None = None,
        src_radius: float = 4.0,
        det_radius: float = 4.0,
        backend: str = "sparse",
        impl: str = "astra_cpu",
        noise: NoiseModel | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.geometry = CTGeometry(
            kind=kind, num_views=int(num_views),
            angle_range_deg=tuple(angle_range_deg) if angle_range_deg is not None else None,
            image_size=int(image_size), extent=float(extent),
            det_count=None if det_count is None else int(det_count),
            src_radius=float(src_radius), det_radius=float(det_radius),
        )
        self.A = RayTransform(self.geometry, backend=backend, impl=impl, cache_dir=cache_dir)
        self.noise = noise if noise is not None else GaussianNoise(relative=0.01)
        self.seed = int(seed)

    @property
    def sino_shape(self) -> tuple[int, int]:
        return self.geometry.sino_shape

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.geometry.image_shape

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.A.adjoint(y)

    @torch.no_grad()
    def measure(self, x: Tensor, ids: Sequence[int | str]) -> Tensor:
        """Noisy measurements of clean images; ``ids`` fix each image's noise."""
        if len(ids) != x.shape[0]:
            raise ValueError(f"measure: {len(ids)} image ids for a batch of {x.shape[0]}")
        return self.noise(self.A(x), ids, self.seed)

    def check_sinogram(self, y: Tensor, source: str = "sinogram") -> None:
        """Clear error before any work when measured data cannot belong to this geometry."""
        expected = self.sino_shape
        if y.ndim < 2 or tuple(y.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"{source}: sinogram shape {tuple(y.shape)} does not match the geometry "
                f"({self.geometry.kind} beam, num_views={expected[0]}, detector={expected[1]}): "
                f"expected (..., {expected[0]}, {expected[1]})"
            )
        if not torch.isfinite(y).all():
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(f"{source}: sinogram holds {bad} NaN/inf values")

    def describe(self) -> dict:
        return {**self.geometry.as_dict(), "backend": self.A.backend, "noise": self.noise.describe()}


__all__ = ["Physics", "NoNoise"]
