"""Intensity and geometry transforms shared by every data source."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

HU_OFFSET = 1024.0
HU_SCALE = 4096.0


def hu_to_unit(hu: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """HU -> attenuation-like x = clip((HU + 1024) / 4096, 0, 1) (reference protocol)."""
    x = (hu + HU_OFFSET) / HU_SCALE
    return x.clip(0.0, 1.0)


def resize_area(img: Tensor, size: int) -> Tensor:
    """Resize a (..., H, W) image to (size, size) by area averaging (exact 2x2 means for 512 -> 256)."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    lead = img.shape[:-2]
    flat = img.reshape(-1, 1, *img.shape[-2:]).float()
    if img.shape[-2] < size or img.shape[-1] < size:
        out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    else:
        out = F.interpolate(flat, size=(size, size), mode="area")
    return out.reshape(*lead, size, size)


class Augment:
    """Training augmentations for axial slices: random flips and small rotations, seeded by the caller.

    Rotation pads with zeros (air), which is what lies outside a CT field of view.
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0.0, max_rotation_deg: float = 10.0) -> None:
        self.hflip, self.vflip, self.max_rot = hflip, vflip, max_rotation_deg

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        u = torch.rand(3, generator=gen)
        if u[0] < self.hflip:
            x = x.flip(-1)
        if u[1] < self.vflip:
            x = x.flip(-2)
        if self.max_rot > 0:
            angle = math.radians((2 * float(u[2]) - 1) * self.max_rot)
            c, s = math.cos(angle), math.sin(angle)
            theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype).unsqueeze(0)
            grid = F.affine_grid(theta, (1, *x.shape), align_corners=False)
            x = F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0]
        return x.clamp(0.0, 1.0)
