"""Image-grid logging that works with any Lightning logger (W&B images, PNG files otherwise)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B,1,H,W) in [0,1] -> uint8 (rows*H, cols*W) mosaic (torchvision does not import here)."""
    x = images.detach().float().clamp(0, 1).cpu()[:, 0]
    b, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    return (grid.numpy() * 255).round().astype(np.uint8)


def log_image_grid(module, key: str, images: torch.Tensor, nrow: int | None = None) -> None:
    """Log a grid under ``key`` to W&B if a WandbLogger is attached, else save a PNG in the run folder."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not trainer.is_global_zero or trainer.sanity_checking:
        return
    grid = make_grid(images, nrow)
    step = trainer.global_step
    logged = False
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_image(key=key, images=[grid], step=step)
            logged = True
    if not logged:
        from PIL import Image

        out = Path(trainer.default_root_dir) / "images"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out / f"{key.replace('/', '_')}_step{step:07d}.png")
