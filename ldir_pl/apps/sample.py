"""``ldir-sample``: unconditional samples from a prior as a PNG grid, the first look at whether a prior is
any good. Sampling runs through diffusers' own pipeline (LDMPipeline for latent priors, DDIMPipeline for
pixel priors) with a DDIM scheduler built from the bundle's noise schedule.

    ldir-sample prior.path=OUT/prior num_images=16 output_dir=S
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from ldir_pl.apps.cli import user_errors
from ldir_pl.apps.conf_dir import CONF_DIR
from ldir_pl.errors import ConfigError
from ldir_pl.models.bundle import PriorBundle
from ldir_pl.models.intensity import IntensityTransform

log = logging.getLogger(__name__)


def pipeline(bundle: PriorBundle):
    """The stock diffusers pipeline for the bundle's kind, with a DDIM scheduler from its schedule."""
    from diffusers import DDIMPipeline, DDIMScheduler, LDMPipeline

    if bundle.transform != IntensityTransform():
        raise ConfigError(f"diffusers' pipelines map [-1, 1] to images; this prior uses {bundle.transform}")
    scheduler = DDIMScheduler.from_config(bundle.scheduler.config, clip_sample=False, timestep_spacing="trailing")
    if bundle.kind == "latent":
        return LDMPipeline(vqvae=bundle.vae, unet=bundle.unet, scheduler=scheduler)
    return DDIMPipeline(unet=bundle.unet, scheduler=scheduler)


def grid(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
    """(N, H, W) in [0, 1] -> one (rows * H, ncol * W) mosaic with 2-pixel gaps."""
    n, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    out = np.ones((nrow * (h + 2) - 2, ncol * (w + 2) - 2), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    return out


def sample(cfg: DictConfig) -> Path:
    """Draw ``num_images`` samples; writes ``samples.png`` (grid) and ``samples.npy``; returns the PNG path."""
    from PIL import Image

    if int(cfg.num_images) < 1 or int(cfg.num_steps) < 1:
        raise ConfigError(f"num_images={cfg.num_images} and num_steps={cfg.num_steps} must be >= 1")
    bundle = PriorBundle.from_pretrained(cfg.prior.path)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto"
                                                                               else cfg.device)
    pipe = pipeline(bundle).to(device)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    images = pipe(batch_size=int(cfg.num_images), generator=generator, num_inference_steps=int(cfg.num_steps),
                  eta=float(cfg.eta), output_type="np").images[..., 0]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", images.astype(np.float32))
    png = out / "samples.png"
    Image.fromarray((grid(images) * 255).round().astype(np.uint8)).save(png)
    print(f"{len(images)} samples from {cfg.prior.path} ({bundle.kind} prior, {bundle.image_size}x{bundle.image_size}, "
          f"{cfg.num_steps} DDIM steps): {png}")
    return png


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors("ldir-sample"):
        sample(cfg)


if __name__ == "__main__":
    main()
