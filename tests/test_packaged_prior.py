"""The CT prior that ships with the package: small, fp16 on disk, fp32 in memory, loadable by diffusers alone, and
the default of ``ldir-reconstruct sampler=ldir`` with no ``prior.path``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors import safe_open

from ldir_pl.models.bundle import PriorBundle
from ldir_pl.priors import packaged_prior

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def test_packaged_prior_is_small_fp16_and_loads_in_fp32():
    path = packaged_prior("ct256")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= 40 * 2**20, f"{path} holds {size / 2**20:.1f} MiB"
    for sub in ("vqvae", "unet"):
        with safe_open(str(path / sub / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    bundle = PriorBundle.from_pretrained(path)
    assert bundle.kind == "latent" and bundle.image_size == 256 and bundle.latent_shape == (16, 32, 32)
    assert {p.dtype for p in [*bundle.unet.parameters(), *bundle.vae.parameters()]} == {torch.float32}


def test_readme_tables_are_the_bundles_own_record(tmp_path):
    """The README's training table is what package_prior.py writes from the bundle's training history (every run,
    minutes per stage, where it ran), and its fidelity table is the bundle's vae_fidelity.json."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from package_prior import write_tables

    path = packaged_prior("ct256")
    history = json.loads((path / "ldir_prior.json").read_text())["training_history"]
    assert {r["stage"] for r in history} == {"vae", "ldm"} and all(r["minutes"] > 0 and r["where"] for r in history)
    write_tables(path, "cmd", tmp_path)
    readme = (path / "README.md").read_text()
    for name in ("training", "vae_fidelity"):
        rows = [ln for ln in (tmp_path / f"{name}.md").read_text().splitlines() if ln.startswith("|")]
        assert rows and all(ln in readme for ln in rows), name  # each row, as written from the JSON


@pytest.mark.skipif(not (SHARED / "ct-dicom").is_dir() or not (SHARED / "ct-volumes").is_dir(),
                    reason="needs ../shared/data")
def test_no_validation_or_test_patient_trained_the_packaged_prior():
    """From the bundle's own record: the patients and volumes that trained it, checked against the splits every
    table evaluates on (ct-dicom's validation and test patients, the held-out volumes)."""
    from hydra.utils import instantiate

    from ldir_pl.config import compose

    record = json.loads((packaged_prior("ct256") / "ldir_prior.json").read_text())["training_data"]
    trained = set(record["train"])
    dicom = instantiate(compose("reconstruct", ["data=dicom", f"data.root={SHARED / 'ct-dicom'}"]).data)
    volumes = instantiate(compose("reconstruct", ["data=ct_volumes", f"paths.data_dir={SHARED}"]).data)
    held_out = {f"dicom:{p}" for s in ("val", "test") for p in dicom.groups(s)} | \
        {f"volumes:{v}" for s in ("val", "test") for v in volumes.groups(s)}
    assert held_out and not trained & held_out, trained & held_out
    assert held_out <= set(record["val"]) | set(record["test"])  # the bundle recorded them as held out
    assert record["train_images"] > 1000  # every slice of the training patients and volumes


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
