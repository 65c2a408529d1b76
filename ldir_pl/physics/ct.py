"""CT: ``A`` is the ray transform of an explicit geometry (parallel / fan beam, sparse-view, limited angle)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from odl.applications import tomo
from torch import Tensor

from ldir_pl.errors import ConfigError, as_int
from ldir_pl.physics.base import LinearPhysics
from ldir_pl.physics.geometry import CTGeometry
from ldir_pl.physics.noise import NoiseModel
from ldir_pl.physics.ray_transform import RayTransform


class CTPhysics(LinearPhysics):
    """y = noise(A x) with A the ray transform; ``A_dagger`` is FBP (ODL ``fbp_op`` with the reference
    protocol's Hann filter at 0.8 frequency scaling), computed on the physically weighted operator that
    ``fbp_op`` is derived for."""

    family = "ct"

    def __init__(
        self,
        *,
        num_views: int,
        image_size: int,
        noise: NoiseModel,
        beam: str = "parallel",
        angle_range_deg: Sequence[float] | None = None,
        extent: float = 1.0,
        det_count: int | None = None,
        src_radius: float = 4.0,
        det_radius: float = 4.0,
        backend: str = "sparse",
        impl: str = "astra_cpu",
        fbp_filter: str = "Hann",
        fbp_frequency_scaling: float = 0.8,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        image_size = as_int(image_size, "physics.image_size")
        super().__init__(image_size, noise, seed)
        self.geometry = CTGeometry(
            beam=beam, num_views=as_int(num_views, "physics.num_views"),
            angle_range_deg=tuple(angle_range_deg) if angle_range_deg is not None else None,
            image_size=image_size, extent=float(extent),
            det_count=None if det_count is None else as_int(det_count, "physics.det_count"),
            src_radius=float(src_radius), det_radius=float(det_radius),
        )
        if not 0 < float(fbp_frequency_scaling) <= 1:
            raise ConfigError(f"physics.fbp_frequency_scaling={fbp_frequency_scaling}: must be in (0, 1]")
        self.ray = RayTransform(self.geometry, backend=backend, impl=impl, cache_dir=cache_dir)
        self.fbp_filter, self.fbp_frequency_scaling = fbp_filter, float(fbp_frequency_scaling)
        self._fbp = None

    @property
    def meas_shape(self) -> tuple[int, int]:
        return self.geometry.sino_shape

    @property
    def label(self) -> str:
        g = self.geometry
        a0, a1 = g.angles_deg
        return f"{g.beam} beam, {g.num_views} views over [{a0:g}, {a1:g}) deg"

    def A(self, x: Tensor) -> Tensor:
        return self.ray(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.ray.adjoint(y)

    @torch.no_grad()
    def A_dagger(self, y: Tensor) -> Tensor:
        """FBP, image by image (ODL)."""
        self.check(y, "A_dagger input")
        if self._fbp is None:
            weighted = self.geometry.odl_ray_transform(self.ray.impl, unit_weighting=False)
            self._fbp = tomo.fbp_op(weighted, padding=True, filter_type=self.fbp_filter,
                                    frequency_scaling=self.fbp_frequency_scaling)
        arr = y.detach().to("cpu", torch.float32).numpy()
        out = np.stack([self._fbp(self._fbp.domain.element(s[0])).data for s in arr]).astype(np.float32)
        return torch.from_numpy(out).unsqueeze(1).to(y.device)

    def weights(self) -> tuple[float, float, tuple[float, float]]:
        """ODL's cell volumes of the physically weighted spaces (the reference protocol's TV problem)."""
        ray = self.geometry.odl_ray_transform(self.ray.impl, unit_weighting=False)
        return float(ray.domain.cell_volume), float(ray.range.cell_volume), tuple(
            float(c) for c in ray.domain.cell_sides)

    def key(self) -> str:
        return f"ct-{self.geometry.key()}-{self.fbp_filter}-{self.fbp_frequency_scaling}"

    def describe(self) -> dict:
        return {**self.geometry.as_dict(), "backend": self.ray.backend, "fbp_filter": self.fbp_filter,
                "fbp_frequency_scaling": self.fbp_frequency_scaling, "noise": self.noise.describe()}
