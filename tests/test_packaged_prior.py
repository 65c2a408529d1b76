"""The CT prior that ships with the package: small, fp16 on disk, fp32 in memory, loadable by diffusers alone, and
the default of ``ldir-reconstruct sampler=ldir`` with no ``prior.path``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from pydicom.data import get_testdata_file
from safetensors import safe_open

from ldir_pl.models.bundle import PriorBundle
from ldir_pl.priors import packaged_prior

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_prior_is_small_fp16_and_loads_in_fp32():
    path = packaged_prior("ct256")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= 24e6, f"{path} holds {size / 1e6:.1f} MB"
    for sub in ("vqvae", "unet"):
        with safe_open(str(path / sub / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    bundle = PriorBundle.from_pretrained(path)
    assert bundle.kind == "latent" and bundle.image_size == 256 and bundle.latent_shape == (16, 32, 32)
    assert {p.dtype for p in [*bundle.unet.parameters(), *bundle.vae.parameters()]} == {torch.float32}
    readme = (path / "README.md").read_text()
    for words in ("ldir-train experiment=ct_cpu_long", "train_summary.json", "licen", "decode(encode(x))"):
        assert words.lower() in readme.lower(), words
    assert json.loads((path / "train_summary.json").read_text())["ldm"]["seconds"] > 0


def test_diffusers_alone_samples_the_packaged_prior():
    from diffusers import LDMPipeline

    pipe = LDMPipeline.from_pretrained(packaged_prior("ct256"), use_safetensors=True).to(dtype=torch.float32)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 256, 256, 1)


def test_reconstruct_runs_with_no_prior_path(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ldir_pl.apps.reconstruct", "data=dicom", f"data.root={tmp_path}", "data.val_fraction=0",
         "data.test_fraction=0", "physics.num_views=23", "sampler=ldir", "sampler.num_steps=2",
         "sampler.guidance.final_steps=2", "tv.max_iterations=30", f"output_dir={out}",
         "trainer.enable_progress_bar=false", "sampler.progress=false"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ldir"]["n"] == 1 and summary["ldir"]["psnr"] > summary["fbp"]["psnr"]
