"""Prior bundle: save/load round trip through diffusers, diffusers' LDMPipeline loading it, safetensors only,
encode/decode with the stored transform, ``ldir-sample``'s grid, clear errors for wrong folders."""

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
    vae = build_autoencoder(image_size=32, block_out_channels=[8, 16, 16], latent_channels=4, layers_per_block=1,
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
    assert isinstance(AutoencoderKL.from_pretrained(tmp_path / "prior" / "vqvae"), AutoencoderKL)
    assert isinstance(UNet2DModel.from_pretrained(tmp_path / "prior" / "unet"), UNet2DModel)
    assert DDPMScheduler.from_pretrained(tmp_path / "prior" / "scheduler").config.num_train_timesteps == 50
    json.loads((tmp_path / "prior" / "ldir_prior.json").read_text())


def test_pixel_bundle_has_no_vae_and_kind_is_checked(tmp_path):
    _, unet, sched = parts(latent=False)
    save_prior(tmp_path / "pix", None, unet, sched, {"image_size": 32})
    assert not (tmp_path / "pix" / "vqvae").exists()
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

    shutil.rmtree(tmp_path / "broken" / "vqvae")
    with pytest.raises(ValueError, match="broken is an incomplete latent prior bundle: missing vae/"):
        load_prior(tmp_path / "broken")


def test_stock_ldm_pipeline_loads_the_bundle(tmp_path):
    """diffusers alone: LDMPipeline.from_pretrained(prior) samples images the bundle's own decoder gives."""
    from diffusers import DDPMPipeline, LDMPipeline

    vae, unet, sched = parts()
    prior = save_prior(tmp_path / "prior", vae, unet, sched, {"image_size": 32, "scaling_factor": 0.7})
    index = json.loads((prior / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    pipe = LDMPipeline.from_pretrained(prior, use_safetensors=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 1) and 0 <= images.min() and images.max() <= 1
    # the pipeline's last step is the bundle's decode (scaling factor and intensity transform included)
    b = load_prior(prior)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = (pipe.vqvae.decode(z / pipe.vqvae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(b.decode(z).clamp(0, 1), ref)
        x = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(b.encode(x), 0.7 * b.vae.encode(2 * x - 1).latent_dist.mean)
    _, pixel_unet, pixel_sched = parts(latent=False)
    pix = save_prior(tmp_path / "pix", None, pixel_unet, pixel_sched, {"image_size": 32})
    assert isinstance(DDPMPipeline.from_pretrained(pix, use_safetensors=True), DDPMPipeline)


def test_pickled_weights_are_refused_and_old_layout_loads(tmp_path):
    vae, unet, sched = parts()
    prior = save_prior(tmp_path / "prior", vae, unet, sched, {"image_size": 32})
    (prior / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), prior / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.bin: pickled weights; priors load from "
                                         r"diffusion_pytorch_model.safetensors only"):
        load_prior(prior)
    old = save_prior(tmp_path / "old", vae, unet, sched, {"image_size": 32})  # bundles from before vqvae/
    (old / "vqvae").rename(old / "vae")
    (old / "model_index.json").unlink()
    assert load_prior(old).vae is not None


def test_ldir_sample_writes_a_grid(tmp_path):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    vae, unet, sched = parts()
    prior = save_prior(tmp_path / "prior", vae, unet, sched, {"image_size": 32})
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "-m", "ldir_pl.apps.sample", f"prior.path={prior}", "num_images=5",
                           "num_steps=2", f"output_dir={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = np.load(out / "samples.npy")
    assert samples.shape == (5, 32, 32) and np.isfinite(samples).all()
    assert Image.open(out / "samples.png").size == (3 * 34 - 2, 2 * 34 - 2)  # 3 columns x 2 rows, 2 px gaps
    assert str(out / "samples.png") in proc.stdout and (out / ".hydra" / "config.yaml").exists()
    bad = subprocess.run([sys.executable, "-m", "ldir_pl.apps.sample", f"prior.path={tmp_path / 'nope'}",
                          f"output_dir={tmp_path / 'x'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"ldir-sample: error: prior bundle not found: {tmp_path}")
