"""Pixel-space DDPM on full-size images: the prior of the pixel-space DPS baseline."""

from __future__ import annotations

from typing import Any

import torch

from .latent_diffusion import DiffusionModule
from .vae import from_model, to_model


class PixelDDPMModule(DiffusionModule):
    """Same training loop and UNet widths as the latent model, diffusing images mapped to [-1, 1]."""

    kind = "pixel"

    def __init__(self, *, image_size: int, **diffusion: Any) -> None:
        super().__init__(**diffusion)
        self.save_hyperparameters()
        self.image_size = int(image_size)
        self._init_networks(1, self.image_size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return to_model(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return from_model(z)
