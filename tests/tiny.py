"""Tiny real parts shared by the tests: diffusers priors (random weights), phantoms."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from ldir_pl.models.bundle import PriorBundle
from ldir_pl.physics import GaussianNoise

SIZE = 32
TRANSFORM = {"intensity_transform": {"type": "affine", "scale": 2.0, "shift": -1.0, "data_range": [0, 1]}}


def tiny_latent_bundle(size: int = SIZE, prediction_type: str = "epsilon") -> PriorBundle:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, layers_per_block=1)
    lat = size // 2
    unet = UNet2DModel(sample_size=lat, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    return PriorBundle(unet=unet.eval(), scheduler=sched, vae=vae.eval(), scaling_factor=0.5, image_size=size,
                       latent_shape=(4, lat, lat), kind="latent", metadata=dict(TRANSFORM))


def tiny_pixel_bundle(size: int = SIZE) -> PriorBundle:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    return PriorBundle(unet=unet.eval(), scheduler=sched, vae=None, scaling_factor=1.0, image_size=size,
                       latent_shape=(1, size, size), kind="pixel", metadata=dict(TRANSFORM))


def phantom(n: int = 2, size: int = SIZE) -> torch.Tensor:
    """Discs of two intensities, one image per radius."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for k in range(n):
        r = 0.5 + 0.1 * k
        img = 0.3 * ((xx**2 + yy**2) < r**2).float() + 0.4 * (((xx - 0.2) ** 2 + yy**2) < 0.04).float()
        imgs.append(img)
    return torch.stack(imgs)[:, None]


#: the reference protocol's noise (conf/physics/noise/gaussian.yaml), for physics built in tests
NOISE = GaussianNoise(relative=0.01)


def tiny_module(kind: str, **overrides):
    """``model.<kind>`` (vae | ldm | pixel_ddpm) of ``experiment=demo debug=tiny``, built as the training app
    builds it: the YAML is where hyperparameters live, ``overrides`` change what a test needs."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from ldir_pl.apps.train import compose_config

    cfg = compose_config(["experiment=demo", "debug=tiny", "logger=none", "output_dir=/nonexistent"])
    node = OmegaConf.merge(OmegaConf.to_container(cfg.model[kind], resolve=True), overrides)
    kwargs = OmegaConf.to_container(node)
    kwargs.pop("_convert_", None)
    return get_class(kwargs.pop("_target_"))(**kwargs)  # called directly: a test sees the module's own errors
