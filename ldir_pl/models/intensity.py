"""The one map between images in [0, 1] and what the networks see (2x - 1 unless a bundle says otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ldir_pl.errors import ConfigError


@dataclass(frozen=True)
class IntensityTransform:
    """network = scale * image + shift; the default maps [0, 1] to [-1, 1] (diffusers' convention)."""

    scale: float = 2.0
    shift: float = -1.0

    def to_model(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def from_model(self, y: Tensor) -> Tensor:
        """Not clamped, so gradients pass; clamp where an image is shown or scored."""
        return (y - self.shift) / self.scale

    def as_dict(self) -> dict[str, Any]:
        return {"type": "affine", "scale": self.scale, "shift": self.shift, "data_range": [0.0, 1.0]}

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> IntensityTransform:
        t = (metadata or {}).get("intensity_transform") or {}
        if t.get("type", "affine") != "affine":
            raise ConfigError(f"unsupported intensity transform in the prior metadata: {t}")
        return cls(float(t.get("scale", 2.0)), float(t.get("shift", -1.0)))


DEFAULT = IntensityTransform()
