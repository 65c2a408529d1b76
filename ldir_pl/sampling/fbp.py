"""Filtered back-projection baseline (ODL ``fbp_op``), image by image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from odl.applications import tomo
from torch import Tensor

from ldir_pl.physics import Physics


class FBPReconstructor:
    """FBP on ODL's physically weighted ray transform (the scaling ``fbp_op`` is derived for).

    ``clip`` keeps the output in [0, 1] like every other method, so metrics compare like with like.
    """

    name = "fbp"

    def __init__(self, filter_type: str = "Hann", frequency_scaling: float = 0.8, padding: bool = True,
                 clip: bool = True) -> None:
        if not 0 < frequency_scaling <= 1:
            raise ValueError(f"sampler.frequency_scaling={frequency_scaling}: must be in (0, 1]")
        self.filter_type, self.frequency_scaling = filter_type, float(frequency_scaling)
        self.padding, self.clip = bool(padding), bool(clip)
        self._ops: dict[str, object] = {}

    def operator(self, physics: Physics):
        key = physics.geometry.key()
        if key not in self._ops:
            ray = physics.geometry.odl_ray_transform(physics.A.impl, unit_weighting=False)
            self._ops[key] = tomo.fbp_op(ray, padding=self.padding, filter_type=self.filter_type,
                                         frequency_scaling=self.frequency_scaling)
        return self._ops[key]

    @torch.no_grad()
    def reconstruct(self, y: Tensor, physics: Physics, ids: Sequence[int | str] | None = None) -> Tensor:
        physics.check_sinogram(y)
        op = self.operator(physics)
        arr = y.detach().to("cpu", torch.float32).numpy()
        out = np.stack([op(op.domain.element(s[0])).data for s in arr]).astype(np.float32)
        x = torch.from_numpy(out).unsqueeze(1).to(y.device)
        return x.clamp(0, 1) if self.clip else x
