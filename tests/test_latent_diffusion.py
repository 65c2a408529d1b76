"""LatentDiffusionModule: tiny real fit on a frozen VAE, scaling factor, EMA, NaN guard, kind checks."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_vae import fit, smooth_images
from tiny import tiny_module

from ldir_pl.models import LatentDiffusionModule, NaNGuard, NonFiniteLossError
from ldir_pl.models.ema import EMA
from ldir_pl.models.schedules import WarmupCosine, make_ddpm_scheduler


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    pl.seed_everything(0)
    return tiny_module("vae").export(tmp_path_factory.mktemp("vae") / "model")


def ldm(vae_dir, **kw) -> LatentDiffusionModule:
    args = dict(vae_path=str(vae_dir), scheduler={"num_train_timesteps": 100}, lr=2e-3, warmup_steps=2,
                num_val_samples=2, val_inference_steps=3,
                sample_posterior=False)  # the untrained VAE's posterior noise would swamp the structure
    return tiny_module("ldm", **{**args, **kw})


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


def test_latent_cache_encodes_each_training_image_once(vae_dir, tmp_path):
    from test_nifti_mix import _write

    from ldir_pl.data import NiftiDataModule

    vol = (smooth_images(12).squeeze(1).permute(1, 2, 0).numpy() * 2000 - 1000).astype("int16")
    (tmp_path / "vols").mkdir()
    _write(tmp_path / "vols" / "a.nii.gz", vol)
    dm = NiftiDataModule(root=str(tmp_path / "vols"), image_size=32, batch_size=4, val_fraction=0.0)
    pl.seed_everything(0)
    module = ldm(vae_dir, cache_latents=True, sample_posterior=True, num_val_samples=0)
    calls = []
    encode = module.vae.encode
    module.vae.encode = lambda x: (calls.append(x.shape[0]), encode(x))[1]
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert sum(calls) == 12  # once per training image, none per step
    assert module._cache.shape == (12, 8, 8, 8)  # mean and std of 4 latent channels at 32 / 4
    assert int(module.ema.num_updates) == 6 and float(module.scaling_factor) > 0
    # within an epoch every cached latent is drawn once
    module._order = None
    module._cache = torch.arange(12.0).view(12, 1, 1, 1).repeat(1, 2, 1, 1)
    module._cache[:, 1] = 0  # zero std: the draw is the mean, i.e. the index
    module.scaling_factor.fill_(1.0)
    drawn = torch.cat([module._cached_latents(4).flatten() for _ in range(3)])
    assert sorted(drawn.tolist()) == list(range(12))
    # augmented data cannot be cached
    dm.augment = True
    with pytest.raises(ValueError, match="stages.ldm.data.augment=false"):
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                   enable_progress_bar=False).fit(ldm(vae_dir, cache_latents=True), datamodule=dm)
