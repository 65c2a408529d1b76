"""VAEModule: a tiny real fit, export/load round trip, clear errors for wrong inputs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tiny import tiny_module
from torch.utils.data import DataLoader

from ldir_pl.models import load_vae


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 1, size // 8, size // 8, generator=g), size=(size, size), mode="bilinear")


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(module, steps: int, tmp_path, data=None, **trainer_kwargs) -> LossRecorder:
    data = smooth_images(32) if data is None else data
    rec = LossRecorder()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
                         num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data[:8], batch_size=8))
    return rec


def test_vae_fit_loss_falls_and_is_finite(tmp_path):
    pl.seed_everything(0)
    module = tiny_module("vae", lr=3e-3, warmup_steps=2)
    rec = fit(module, 40, tmp_path, enable_checkpointing=True)
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    assert last < 0.7 * first, (first, last)
    x = smooth_images(4, seed=1)
    out, post = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert post.mean.shape == (4, 4, 8, 8)  # 32 / 4
    # grid image written (no W&B logger: PNG in the run folder)
    assert list((tmp_path / "images").glob("val_reconstructions_*.png"))


def test_vae_export_and_checkpoint_load_round_trip(tmp_path):
    pl.seed_everything(0)
    module = tiny_module("vae")
    fit(module, 2, tmp_path, enable_checkpointing=True)
    module.eval()
    x = smooth_images(2)
    ref = module.vae.decode(module.vae.encode(x * 2 - 1).latent_dist.mode()).sample
    for source in (module.export(tmp_path / "vae_model"), next((tmp_path / "checkpoints").glob("*.ckpt"))):
        vae = load_vae(source).eval()
        out = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample
        torch.testing.assert_close(out, ref)


def test_train_crop_and_factor_errors():
    m = tiny_module("vae", train_crop=16)
    assert m._random_crop(torch.rand(2, 1, 32, 32)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="multiple of downsample_factor=4"):
        tiny_module("vae", train_crop=10)._random_crop(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="does not divide image_size=36"):
        tiny_module("vae", image_size=36, autoencoder={"block_out_channels": [8, 16, 16, 16]})


def test_load_vae_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_vae(tmp_path / "empty")
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "ldir_kind": "latent"}, bad)
    with pytest.raises(ValueError, match="other.ckpt is not a VAE checkpoint"):
        load_vae(bad)
