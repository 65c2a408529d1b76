"""The ``ldir-reconstruct`` app end to end, as the independent evaluation calls it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from tiny import tiny_latent_bundle

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd=ROOT, check=True, env=None):
    env = {**({**os.environ, "OMP_NUM_THREADS": "1"} if env is None else env), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "ldir_pl.apps.reconstruct", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dicom")
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "CT_small.dcm")
    return d


@pytest.mark.parametrize("sampler", ["fbp", "tv"])
def test_evaluation_call(sampler, dicom_dir, tmp_path):
    out = tmp_path / "res"
    _run(["data=dicom", f"data.root={dicom_dir}", "physics.num_views=23", "physics.noise.relative=0.01",
          f"sampler={sampler}", f"output_dir={out}", "data.image_size=64", "tv.max_iterations=50"
          if sampler == "tv" else "physics.fbp_filter=Hann"])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary[sampler]) == {"psnr", "ssim", "seconds_per_image", "peak_mem_mb", "n"}
    assert summary[sampler]["n"] == 1 and summary[sampler]["psnr"] > 15
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("id,method,psnr,ssim") and len(lines) == 1 + len(summary)
    assert list((out / "panels").glob("*.png")) and (out / ".hydra" / "config.yaml").exists()


def test_ldir_with_prior_bundle_and_errors(tmp_path):
    from ldir_pl.models.bundle import save_prior

    b = tiny_latent_bundle(size=32)
    prior = save_prior(tmp_path / "prior", b.vae, b.unet, b.scheduler,
                       {**b.metadata, "image_size": 32, "scaling_factor": b.scaling_factor})
    out = tmp_path / "res"
    common = ["data=phantom", "data.image_size=32", "data.num_test=2", "data.predict_split=test",
              "physics.num_views=12", "sampler=ldir", "sampler.num_steps=3", "sampler.progress=false"]
    proc = _run([*common, f"prior.path={prior}", "baselines=[fbp,latent_dps]", f"output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["fbp", "latent_dps", "ldir"] and summary["ldir"]["n"] == 2
    assert "ldir" in proc.stdout
    bad = _run([*common, f"prior.path={tmp_path / 'nope'}", f"output_dir={tmp_path / 'x'}"], check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("ldir-reconstruct: error: prior bundle not found:")
    assert "nope" in bad.stderr
    wrong = _run([*common, "data.image_size=64", f"prior.path={prior}", f"output_dir={tmp_path / 'y'}"],
                 check=False)
    assert wrong.returncode == 2 and "32" in wrong.stderr and "64" in wrong.stderr


def test_multirun_over_views_writes_joint_table_and_plot(tmp_path):
    """``-m`` over views x methods: one folder per job, and a table + PSNR-vs-views plot over all jobs."""
    sweep = tmp_path / "sweep"
    _run(["-m", f"hydra.sweep.dir={sweep}", f"output_dir={sweep}", "data=phantom", "data.image_size=32",
          "data.num_test=2", "physics.num_views=8,16", "sampler=fbp,tv", "baselines=[]", "num_panels=1"])
    jobs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert len(jobs) == 4, jobs
    assert all(j[0].isdigit() and "baselines" not in j and "num_panels" not in j for j in jobs), jobs
    results = json.loads((sweep / "sweep_summary.json").read_text())
    assert set(results) == {"fbp", "tv"} and set(results["tv"]) == {"8", "16"}
    # more views must help both methods, and TV must beat FBP on piecewise-constant phantoms
    for m in ("fbp", "tv"):
        assert results[m]["16"]["psnr"] > results[m]["8"]["psnr"]
    assert results["tv"]["8"]["psnr"] > results["fbp"]["8"]["psnr"]
    table = (sweep / "table.md").read_text()
    assert "| tv (n=2) |" in table and "16 views" in table
    assert (sweep / "psnr_vs_views.png").stat().st_size > 1000


def test_wandb_run_holds_panels_and_per_image_table(tmp_path):
    from wandb_records import summary as wandb_summary

    out = tmp_path / "res"
    _run(["data=phantom", "data.image_size=32", "data.num_test=3", "physics.num_views=8", "sampler=fbp",
          "baselines=[]", "logger=wandb", f"output_dir={out}"])
    (run,) = (out / "wandb").glob("offline-run-*")
    (run_file,) = run.glob("run-*.wandb")
    logged = wandb_summary(run_file)
    assert {"fbp/psnr", "fbp/ssim", "fbp/seconds_per_image", "reconstructions/path"} <= logged["keys"]
    (table_file,) = (run / "files" / "media" / "table").glob("reconstructions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["id", "method", "psnr", "ssim", "panel"] and len(table["data"]) == 3
    metrics = (out / "metrics.csv").read_text().splitlines()[1:]
    assert sorted(f"{r[0]},{r[1]}" for r in table["data"]) == sorted(",".join(m.split(",")[:2]) for m in metrics)
    # a table with images is stored by W&B as a run_table artifact that carries the PNG panels
    (kind, files), = [v for k, v in logged["artifacts"].items() if k.endswith("-reconstructions")]
    panels = sorted(Path(f).name for f in files if f.endswith(".png"))
    assert kind == "run_table" and panels == sorted(p.name for p in (out / "panels").glob("*.png"))


@pytest.mark.parametrize("app", ["reconstruct", "train", "sample"])
def test_help_opens_with_purpose_and_examples(app):
    proc = subprocess.run([sys.executable, "-m", f"ldir_pl.apps.{app}", "--help"], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith(f"ldir-{app}: ")
    assert sum(line.startswith(f"  ldir-{app} ") for line in lines[:12]) == 2  # two example calls up front
    if app == "reconstruct":  # every physics, sampler and data config is named
        head = proc.stdout.split("== Config")[0]
        for group in ("physics", "sampler", "data"):
            for f in (ROOT / "conf" / group).glob("*.yaml"):
                assert f.stem in head, (group, f.stem)


def test_missing_setting_is_one_line_and_exit_2(tmp_path):
    proc = _run(["data=dicom", f"output_dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.root" in proc.stderr.strip().splitlines()[-1]
