"""Prior bundle: save/load round trip through diffusers, clear errors for wrong folders."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from omegaconf import OmegaConf

from ldir_pl.models import load_prior, save_prior
from ldir_pl.models.latent_diffusion import build_unet
from ldir_pl.models.schedules import make_ddpm_scheduler
from ldir_pl.models.vae import build_autoencoder


def parts(latent: bool = True):
    torch.manual_seed(0)
    vae = build_autoencoder(image_size=32, downsample_factor=4, block_out_channels=[8, 16, 16],
                            norm_num_groups=8, mid_block_add_attention=False) if latent else None
    unet = build_unet(8 if latent else 32, 4 if latent else 1, block_out_channels=[16, 32],
                      layers_per_block=1, norm_num_groups=8, attention_levels=[1])
    return vae, unet, make_ddpm_scheduler(num_train_timesteps=50, prediction_type="v")


def test_latent_round_trip(tmp_path):
    vae, unet, sched = parts()
    meta = {"image_size": 32, "scaling_factor": 0.7, "training_config": OmegaConf.create({"w": [1, 2]})}
    save_prior(tmp_path / "prior", vae, unet, sched, meta)
    b = load_prior(tmp_path / "prior", kind="latent")
    assert (b.kind, b.image_size, b.latent_shape, b.scaling_factor) == ("latent", 32, (4, 8, 8), 0.7)
    assert b.metadata["training_config"] == {"w": [1, 2]}
    assert b.vae.config.scaling_factor == pytest.approx(0.7)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        torch.testing.assert_close(b.unet(z, t).sample, unet.eval()(z, t).sample)
        x = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(b.vae.decode(b.vae.encode(x).latent_dist.mode()).sample,
                                   vae.eval().decode(vae.encode(x).latent_dist.mode()).sample)
    ddim = DDIMScheduler.from_config(b.scheduler.config)
    assert ddim.config.clip_sample is False and ddim.config.prediction_type == "v_prediction"
    # diffusers alone loads the parts
    assert isinstance(AutoencoderKL.from_pretrained(tmp_path / "prior" / "vae"), AutoencoderKL)
    assert isinstance(UNet2DModel.from_pretrained(tmp_path / "prior" / "unet"), UNet2DModel)
    assert DDPMScheduler.from_pretrained(tmp_path / "prior" / "scheduler").config.num_train_timesteps == 50
    json.loads((tmp_path / "prior" / "ldir_prior.json").read_text())


def test_pixel_bundle_has_no_vae_and_kind_is_checked(tmp_path):
    _, unet, sched = parts(latent=False)
    save_prior(tmp_path / "pix", None, unet, sched, {"image_size": 32})
    assert not (tmp_path / "pix" / "vae").exists()
    b = load_prior(tmp_path / "pix")
    assert b.kind == "pixel" and b.vae is None and b.latent_shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"pix holds a 'pixel' prior, but a 'latent' prior was requested"):
        load_prior(tmp_path / "pix", kind="latent")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_prior"):
        load_prior(tmp_path / "missing_prior")
    (tmp_path / "not_a_bundle").mkdir()
    with pytest.raises(ValueError, match="not_a_bundle is not an ldir prior bundle"):
        load_prior(tmp_path / "not_a_bundle")
    vae, unet, sched = parts()
    save_prior(tmp_path / "broken", vae, unet, sched, {"image_size": 32})
    import shutil

    shutil.rmtree(tmp_path / "broken" / "vae")
    with pytest.raises(ValueError, match="broken is an incomplete latent prior bundle: missing vae/"):
        load_prior(tmp_path / "broken")
