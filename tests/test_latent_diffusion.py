"""LatentDiffusionModule: tiny real fit on a frozen VAE, scaling factor, EMA, NaN guard, kind checks."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_vae import TINY, fit, smooth_images

from ldir_pl.models import LatentDiffusionModule, NaNGuard, NonFiniteLossError, VAEModule
from ldir_pl.models.ema import EMA
from ldir_pl.models.schedules import WarmupCosine, make_ddpm_scheduler

UNET = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_levels=[1])


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    pl.seed_everything(0)
    return VAEModule(**TINY).export(tmp_path_factory.mktemp("vae") / "model")


def ldm(vae_dir, **kw) -> LatentDiffusionModule:
    args = dict(vae_path=str(vae_dir), image_size=32, unet=UNET, scheduler={"num_train_timesteps": 100},
                lr=2e-3, warmup_steps=2, num_val_samples=2, val_inference_steps=3,
                sample_posterior=False)  # the untrained VAE's posterior noise would swamp the structure
    return LatentDiffusionModule(**{**args, **kw})


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ldm_fit_loss_falls(vae_dir, tmp_path, prediction):
    pl.seed_everything(0)
    module = ldm(vae_dir, scheduler={"num_train_timesteps": 100, "prediction_type": prediction})
    assert module.noise_scheduler.config.clip_sample is False
    rec = fit(module, 60, tmp_path, enable_checkpointing=False)
    first, last = sum(rec.losses[:8]) / 8, sum(rec.losses[-8:]) / 8
    assert last < 0.85 * first, (first, last)
    # scaling factor estimated from the training data: unit-variance latents
    sf = float(module.scaling_factor)
    assert sf > 0
    with torch.no_grad():
        z = module.encode(smooth_images(32))
    assert 0.8 < float(z.std()) < 1.25
    samples = module.sample(2, num_inference_steps=3)
    assert samples.shape == (2, 1, 32, 32) and torch.isfinite(samples).all()
    assert int(module.ema.num_updates) == 60


def test_given_scaling_factor_is_kept(vae_dir, tmp_path):
    module = ldm(vae_dir, scaling_factor=0.5)
    fit(module, 1, tmp_path, enable_checkpointing=False)
    assert float(module.scaling_factor) == 0.5


def test_wrong_kind_vae_path_is_a_clear_error(vae_dir, tmp_path):
    module = ldm(vae_dir)
    ckpt = tmp_path / "latent.ckpt"
    checkpoint = {"state_dict": module.state_dict(), "ldir_kind": module.kind}
    torch.save(checkpoint, ckpt)
    with pytest.raises(ValueError, match="latent.ckpt is not a VAE checkpoint"):
        ldm(ckpt)
    with pytest.raises(FileNotFoundError, match="missing_vae"):
        ldm(tmp_path / "missing_vae")


class NaNAt(LatentDiffusionModule):
    bad_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.bad_step else loss


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(vae_dir, tmp_path):
    module = NaNAt(**ldm(vae_dir).hparams)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[ckpt_cb, NaNGuard()], num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match="global step 3.*last good checkpoint: .*last.ckpt"):
        trainer.fit(module, torch.utils.data.DataLoader(smooth_images(32), batch_size=4))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())  # bad step never applied


def test_ema_and_schedules():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5, warmup=False)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.module.weight.clone()
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 0.5 * net.weight)
    lam = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lam(0) < lam(9) <= 1.0 and abs(lam(10) - 1.0) < 1e-9 and abs(lam(110) - 0.1) < 1e-9
    assert make_ddpm_scheduler(beta_schedule="cosine").config.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="beta_schedule"):
        make_ddpm_scheduler(beta_schedule="quadratic")
