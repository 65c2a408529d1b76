"""ldir-train end to end (subprocesses, tiny sizes): both stages + bundle, W&B offline, multirun,
2-process CPU DDP, resume, and a wrong-kind VAE checkpoint rejected before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldir_pl.apps.train import compose_config
from ldir_pl.models import load_prior

TINY = ["experiment=demo", "debug=tiny", "logger=none"]


def ldir_train(*overrides: str, tmp_path: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", **({"HYDRA_FULL_ERROR": "1"} if check else {})}  # failures: the user's view
    flags = [o for o in overrides if o.startswith("-")]
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    proc = subprocess.run([sys.executable, "-m", "ldir_pl.apps.train", *flags, *TINY, *overrides], env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"ldir-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prior")
    out = tmp / "out"
    ldir_train(f"output_dir={out}", "logger=wandb", tmp_path=tmp)
    return out


def test_in_process_training_of_the_tiny_config(tiny_train_config):
    """The library path (no CLI): ``train_prior`` on the composed ``debug=tiny`` config."""
    from ldir_pl.apps.train import train_prior

    prior = train_prior(tiny_train_config)
    bundle = load_prior(prior, kind="latent")
    assert bundle.image_size == 32 and bundle.latent_shape == (4, 8, 8)
    out = prior.parent
    assert (out / "config.yaml").exists() and json.loads((out / "train_summary.json").read_text())["ldm"]["seconds"] > 0


def test_prior_stage_exports_loadable_bundle(prior_run):
    bundle = load_prior(prior_run / "prior", kind="latent")
    assert bundle.image_size == 32 and bundle.latent_shape == (4, 8, 8)
    assert bundle.scaling_factor > 0 and bundle.scheduler.config.clip_sample is False
    assert bundle.metadata["training_config"]["experiment_name"] == "demo"
    assert (prior_run / "vae" / "model" / "config.json").exists()
    assert (prior_run / ".hydra" / "config.yaml").exists()  # configs saved next to the outputs
    assert (prior_run / "vae" / "checkpoints" / "last.ckpt").exists()


def test_wandb_offline_run_files(prior_run):
    """One run per stage, each holding its image panels, metrics (the prior-quality figure too) and the exported model
    as an artifact."""
    from wandb_records import (
        summary as wandb_summary,  # wandb only where it is used: a run without it still collects
    )

    runs = {}
    for run in (prior_run / "wandb").glob("offline-run-*"):
        (run_file,) = run.glob("run-*.wandb")
        s = wandb_summary(run_file)
        runs["vae" if "val/psnr" in s["keys"] else "ldm"] = (run, s)
    assert set(runs) == {"vae", "ldm"}, runs
    vae_run, vae = runs["vae"]
    assert {"val/loss", "val/psnr", "val/ssim", "val/reconstructions/filenames"} <= vae["keys"]
    assert list((vae_run / "files" / "media" / "images" / "val").glob("reconstructions_*.png"))
    assert vae["artifacts"]["vae-demo"][0] == "model"
    ldm_run, ldm = runs["ldm"]
    assert {"val/loss", "val/samples/filenames", "val/eps_mse_grid", "val/body_share", "val/hu_w1",
            "val/train_minutes"} <= ldm["keys"]
    assert list((ldm_run / "files" / "media" / "images" / "val").glob("samples_*.png"))
    kind, files = ldm["artifacts"]["prior-demo-ldm"]
    assert kind == "prior" and {"ldir_prior.json", "model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                "vqvae/diffusion_pytorch_model.safetensors"} <= set(files)


def test_resume_from_checkpoint(prior_run, tmp_path):
    ckpt = prior_run / "vae" / "checkpoints" / "last.ckpt"
    proc = ldir_train(f"output_dir={tmp_path / 'resumed'}", "stage=vae", f"ckpt_path={ckpt}",
                      "stages.vae.trainer.max_epochs=2", tmp_path=tmp_path)
    assert "Restoring states from the checkpoint path" in proc.stdout + proc.stderr


def test_wrong_kind_checkpoint_fails_before_training(prior_run, tmp_path):
    ldm_ckpt = prior_run / "ldm" / "checkpoints" / "last.ckpt"
    proc = ldir_train(f"output_dir={tmp_path / 'bad'}", "stage=ldm", f"model.ldm.vae_path={ldm_ckpt}",
                      tmp_path=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{ldm_ckpt} is not a VAE checkpoint" in proc.stderr.strip().splitlines()[-1]
    assert "Epoch 0" not in proc.stdout + proc.stderr
    proc = ldir_train(f"output_dir={tmp_path / 'bad2'}", "stage=vae", f"ckpt_path={ldm_ckpt}",
                      tmp_path=tmp_path, check=False)
    assert proc.returncode == 2 and "holds a latent checkpoint; stage 'vae' needs 'vae'" in proc.stderr


def test_two_point_multirun(tmp_path):
    ldir_train("-m", f"output_dir={tmp_path}", "stage=vae", "model.vae.lr=1e-3,3e-3", tmp_path=tmp_path)
    for job in ("0", "1"):
        assert (tmp_path / "multirun" / job / "vae" / "model" / "config.json").exists()
    assert (tmp_path / "multirun" / "multirun.yaml").exists()


def test_optuna_sweep_runs_two_trials(tmp_path):
    """The shipped Optuna search, cut to 2 trials: each trains, and the study returns the best val/psnr."""
    import yaml

    ldir_train("-m", "hparams_search=vae_optuna", f"output_dir={tmp_path}", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.sampler.n_startup_trials=2", tmp_path=tmp_path)
    sweep = tmp_path / "multirun"
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and {"model.vae.lr", "model.vae.kl_weight", "model.vae.ssim_weight"} <= set(
        result["best_params"])  # data.batch_size is fixed by the tiny overrides
    psnrs = []
    for job in ("0", "1"):
        assert (sweep / job / "vae" / "model" / "config.json").exists()
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.vae.lr=") for o in overrides)
        psnrs.append(json.loads((sweep / job / "train_summary.json").read_text())["vae"]["val/psnr"])
    assert 5 < result["best_value"] == max(psnrs)


def test_ddp_two_cpu_processes(tmp_path):
    proc = ldir_train(f"output_dir={tmp_path}", "stage=vae", "trainer=ddp", tmp_path=tmp_path)
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert (tmp_path / "vae" / "model" / "config.json").exists()


def test_compose_and_presets_resolve():
    data = {"demo": [], "ct_cpu": ["paths.data_dir=/d"], "ct_gpu": ["paths.data_dir=/d"]}
    for exp in ("demo", "ct_cpu", "ct_gpu", "lodopab_256", "mayo_256"):
        cfg = compose_config([f"experiment={exp}"] + data.get(exp, ["data.root=/some/dir"]))
        assert cfg.model.ldm.scheduler.clip_sample is False
        assert cfg.data.image_size % 2 ** (len(cfg.model.vae.autoencoder.block_out_channels) - 1) == 0
    cfg = compose_config(["hparams_search=vae_optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.stage == "vae"


@pytest.mark.parametrize("exp", ["ct_cpu", "ct_gpu"])
def test_ct_recipes_train_two_steps_on_cpu(exp, tmp_path):
    """The recipes as configured (models, ct_mix data, latent cache), on tiny DICOM + NIfTI sources."""
    from test_nifti_mix import _sources

    from ldir_pl.apps.train import train_prior

    _sources(tmp_path)
    steps = [f"++stages.{s}.trainer.{k}={v}" for s in ("vae", "ldm")
             for k, v in (("max_steps", 2), ("max_epochs", 1), ("check_val_every_n_epoch", 1))]
    cfg = compose_config([f"experiment={exp}", f"paths.data_dir={tmp_path}", f"output_dir={tmp_path / 'out'}",
                          "trainer=cpu", "logger=none", f"data.image_size={32 if exp == 'ct_cpu' else 64}",
                          "init_from=null", "stage=prior",
                          "callbacks=default", "++stages.vae.data.batch_size=4",
                          "++stages.ldm.data.batch_size=4", "model.ldm.num_val_samples=1",
                          "model.ldm.val_inference_steps=2", "trainer.num_sanity_val_steps=0",
                          "callbacks.progress_bar.refresh_rate=100", *steps])
    assert cfg.data.sources.dicom.test_fraction > 0 and cfg.model.ldm.cache_latents
    bundle = load_prior(train_prior(cfg))
    assert bundle.latent_shape == {"ct_cpu": (8, 8, 8), "ct_gpu": (16, 8, 8)}[exp]
    assert bundle.metadata["training_config"]["experiment_name"] == exp
