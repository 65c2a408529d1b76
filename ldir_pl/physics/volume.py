"""A volume as a stack of axial slices: the 2-D operator acts on every slice (S,1,H,W) alone, and the slices
keep their order and spacing, so a regulariser can couple them along z (3-D TV) while A stays 2-D."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics.base import LinearPhysics


class VolumePhysics(LinearPhysics):
    """``slice_physics`` applied slice by slice to a z-ordered batch; ``z_ratio`` = in-plane / slice spacing."""

    family = "volume"

    def __init__(self, slice_physics: LinearPhysics, z_ratio: float) -> None:
        if isinstance(slice_physics, VolumePhysics):
            raise ConfigError("VolumePhysics wraps a 2-D operator, not another volume")
        if not float(z_ratio) > 0:
            raise ConfigError(f"volume: z_ratio={z_ratio} (in-plane / slice spacing) must be positive")
        super().__init__(slice_physics.image_size, slice_physics.noise, slice_physics.seed)
        self.slice_physics, self.z_ratio = slice_physics, float(z_ratio)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.slice_physics.image_shape

    @property
    def meas_shape(self) -> tuple[int, ...]:
        return self.slice_physics.meas_shape

    @property
    def label(self) -> str:
        return f"{self.slice_physics.label}, slice by slice (z ratio {self.z_ratio:.3g})"

    def A(self, x: Tensor) -> Tensor:
        return self.slice_physics.A(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.slice_physics.A_adjoint(y)

    def A_dagger(self, y: Tensor) -> Tensor:
        return self.slice_physics.A_dagger(y)

    def compute_norm(self) -> float:
        return self.slice_physics.compute_norm()  # block diagonal: the slices' operator norm

    def weights(self) -> tuple[float, float, tuple[float, float]]:
        return self.slice_physics.weights()

    def measure(self, x: Tensor, ids: Sequence[int | str]) -> Tensor:
        return self.slice_physics.measure(x, ids)

    def check(self, y: Tensor, source: str = "measurement") -> None:
        self.slice_physics.check(y, source)

    def describe(self) -> dict:
        return {**self.slice_physics.describe(), "volume_z_ratio": self.z_ratio}


__all__ = ["VolumePhysics"]
