"""``ldir-sample``: unconditional samples from a prior as a PNG grid, the first look at whether a prior is
any good. DDIM with the bundle's noise schedule (trailing spacing), step by step as diffusers' ``LDMPipeline``
draws them (a test checks they agree), so a signal stops it between steps and a bar shows the rate.

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

from ldir_pl.apps.cli import command_run, run_hydra_app
from ldir_pl.apps.report import window_range
from ldir_pl.atomic import atomic_path
from ldir_pl.config import CONF_DIR
from ldir_pl.errors import ConfigError
from ldir_pl.models.bundle import PriorBundle
from ldir_pl.models.prior_quality import ddim_samples

log = logging.getLogger(__name__)


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
    """Draw ``num_images`` samples; writes ``samples.png`` (grid, in the CT ``window``) and ``samples.npy`` (images
    in [0, 1]); returns the PNG path."""
    from PIL import Image

    window_range(cfg.window)  # an unknown window fails before sampling
    if int(cfg.num_images) < 1 or int(cfg.num_steps) < 1:
        raise ConfigError(f"num_images={cfg.num_images} and num_steps={cfg.num_steps} must be >= 1")
    bundle = PriorBundle.from_pretrained(cfg.prior.path)
    if int(cfg.num_steps) > int(bundle.scheduler.config.num_train_timesteps):
        raise ConfigError(f"num_steps={cfg.num_steps}: the prior's schedule has "
                          f"{bundle.scheduler.config.num_train_timesteps} timesteps")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto"
                                                                               else cfg.device)
    bundle.to(device)
    with torch.no_grad():
        images = ddim_samples(bundle.unet, bundle.scheduler.config, bundle.decode, bundle.latent_shape,
                              int(cfg.num_images), int(cfg.num_steps), int(cfg.seed), eta=float(cfg.eta),
                              progress=bool(cfg.progress))[:, 0].cpu().numpy()
    out = Path(cfg.output_dir)
    with atomic_path(out / "samples.npy") as tmp:
        np.save(tmp, images.astype(np.float32))
    png = out / "samples.png"
    lo, hi = window_range(cfg.window)  # a CT window, as the reconstruction panels: soft tissue reads, not gray
    shown = np.clip((grid(images) - lo) / (hi - lo), 0, 1)
    with atomic_path(png) as tmp:
        Image.fromarray((shown * 255).round().astype(np.uint8)).save(tmp)
    print(f"{len(images)} samples from {cfg.prior.path} ({bundle.kind} prior, {bundle.image_size}x{bundle.image_size}, "
          f"{cfg.num_steps} DDIM steps): {png}")
    return png


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    with command_run("ldir-sample", cfg.output_dir, cfg, overwrite=bool(cfg.overwrite)):
        sample(cfg)


def main() -> None:
    """Console-script entry point (``ldir-sample``)."""
    run_hydra_app("ldir-sample", _hydra_main)


if __name__ == "__main__":
    main()
