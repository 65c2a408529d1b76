"""PixelDDPMModule: tiny real fit on images, finite samples."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from test_vae import fit
from tiny import tiny_module


def test_pixel_ddpm_fit_loss_falls(tmp_path):
    pl.seed_everything(0)
    module = tiny_module("pixel_ddpm", image_size=16, scheduler={"num_train_timesteps": 100, "clip_sample": True},
                         lr=2e-3, warmup_steps=2, num_val_samples=2, val_inference_steps=3)
    data = torch.nn.functional.interpolate(torch.rand(32, 1, 4, 4), size=(16, 16), mode="bilinear")
    rec = fit(module, 40, tmp_path, data=data, enable_checkpointing=False)
    first, last = sum(rec.losses[:8]) / 8, sum(rec.losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    samples = module.sample(2, num_inference_steps=3)
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all()
    assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0
