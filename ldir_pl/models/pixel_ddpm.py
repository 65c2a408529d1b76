"""Pixel-space DDPM on full-size images: the prior of the pixel-space DPS baseline."""

from __future__ import annotations

import torch

from .latent_diffusion import DiffusionModule
from .vae import from_model, to_model


class PixelDDPMModule(DiffusionModule):
    """Same training loop and UNet widths as the latent model, diffusing images mapped to [-1, 1]."""

    kind = "pixel"

    def __init__(
        self,
        image_size: int = 256,
        unet: dict | None = None,
        scheduler: dict | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.999,
        num_val_samples: int = 8,
        val_inference_steps: int = 50,
        sample_seed: int = 0,
    ) -> None:
        super().__init__(unet, scheduler, lr, weight_decay, warmup_steps, min_lr_ratio, ema_decay,
                         num_val_samples, val_inference_steps, sample_seed)
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
