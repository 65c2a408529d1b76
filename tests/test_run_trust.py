"""Runs a user can trust: bad input ends with one line naming the setting or file and exit 2; SIGTERM stops a run
within 5 s with exit 143 and ``run_info.json`` saying ``interrupted``; a used output folder is refused unless
``overwrite=true``; a crash while writing leaves nothing that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from tiny import tiny_latent_bundle

ROOT = Path(__file__).resolve().parents[1]
APPS = {"reconstruct": "ldir_pl.apps.reconstruct", "train": "ldir_pl.apps.train", "sample": "ldir_pl.apps.sample"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
ENV.pop("HYDRA_FULL_ERROR", None)


def start(app: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", APPS[app], *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(app: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", APPS[app], *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def in_process(main, args: list[str], capsys) -> tuple[int, str]:
    """Run a command's ``main`` in this process (no interpreter start-up): (exit status, stderr)."""
    old = sys.argv
    sys.argv = ["ldir", *args]
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    from ldir_pl.models.bundle import save_prior

    b = tiny_latent_bundle(size=32)
    return save_prior(tmp_path_factory.mktemp("prior") / "prior", b.vae, b.unet, b.scheduler,
                      {**b.metadata, "image_size": 32, "scaling_factor": b.scaling_factor})


@pytest.fixture(scope="module")
def mr_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mr")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "MR"
    ds.save_as(d / "mr.dcm")
    return d


# ---------------------------------------------------------------------------------------------- user errors
PHANTOM = ["data=phantom", "data.image_size=32", "data.num_test=1", "data.predict_split=test", "sampler=fbp",
           "physics.image_size=32", "progress=false"]
CASES = {
    "unknown group option": (["sampler=ldirr"], "sampler/ldirr"),
    "typo in a key": (["physics.num_view=23"], "physics.num_view"),
    "typo in a root key": (["num_pannels=2"], "num_pannels"),
    "new key the target does not take": (["+data.max_image=1"], "data.max_image"),
    "output under /proc": (["output_dir=/proc/ldir_out"], "/proc/ldir_out"),
    "output under /sys (not permitted)": (["output_dir=/sys/ldir_out"], "/sys/ldir_out"),
    "no images": (["data.max_images=0"], "data.max_images=0"),
    "negative image count": (["data.max_images=-1"], "data.max_images=-1"),
    "views not a number": (["physics.num_views=abc"], "physics.num_views"),
    "unknown window": (["recon.window=abdomen"], "recon.window"),
    "DICOM out without geometry": (["recon.dicom=true"], "recon.dicom"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reconstruct_user_errors_are_one_line_naming_the_setting(case, tmp_path, capsys):
    from ldir_pl.apps.reconstruct import main

    args, named = CASES[case]
    out = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={tmp_path / 'out'}"]
    code, err = in_process(main, [*PHANTOM, *out, *args], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("ldir-reconstruct: error:") and named in line, err


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    from ldir_pl.apps.reconstruct import main

    (tmp_path / "file").write_text("x")
    code, err = in_process(main, [*PHANTOM, f"output_dir={tmp_path / 'file' / 'out'}"], capsys)
    assert code == 2 and str(tmp_path / "file" / "out") in one_line(err)


@pytest.mark.parametrize("app", ["reconstruct", "sample"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_is_one_line_naming_the_file(app, damage, tiny_prior, tmp_path, capsys):
    from ldir_pl.apps import reconstruct, sample

    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    weights = prior / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    main = reconstruct.main if app == "reconstruct" else sample.main
    args = [*PHANTOM, "sampler=ldir"] if app == "reconstruct" else ["num_images=1", "num_steps=1", "progress=false"]
    code, err = in_process(main, [*args, f"prior.path={prior}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and str(weights) in one_line(err)


def test_mr_dicom_is_refused_and_an_explicit_setting_allows_it(mr_folder, tmp_path, capsys):
    from ldir_pl.apps.reconstruct import main

    data = ["data=dicom", f"data.root={mr_folder}", "data.val_fraction=0", "data.test_fraction=0", "sampler=fbp",
            "data.image_size=64", "physics.image_size=64", "progress=false"]
    code, err = in_process(main, [*data, f"output_dir={tmp_path / 'a'}"], capsys)
    line = one_line(err)
    assert code == 2 and "mr.dcm" in line and "Modality is MR" in line
    status = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert status["status"] == "failed" and "Modality is MR" in status["error"]
    assert "Modality is MR" in (tmp_path / "a" / "reconstruct.log").read_text()  # the error is in the log too
    code, _ = in_process(main, [*data, "data.modalities=[CT,MR]", f"output_dir={tmp_path / 'b'}"], capsys)
    assert code == 0


def test_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    from ldir_pl.apps import reconstruct

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(reconstruct, "summarize", broken)
    with pytest.raises(ZeroDivisionError):
        in_process(reconstruct.main, [*PHANTOM, f"output_dir={tmp_path / 'out'}"], capsys)
    status = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert status["status"] == "failed" and "ZeroDivisionError" in status["error"]


# ---------------------------------------------------------------------------------------------- used folders
def test_used_output_dir_is_refused_unless_overwrite(tmp_path, capsys):
    from ldir_pl.apps.reconstruct import main

    out = tmp_path / "out"
    assert in_process(main, [*PHANTOM, f"output_dir={out}"], capsys)[0] == 0
    assert json.loads((out / "run_info.json").read_text())["status"] == "complete"
    stale = out / "panels" / "stale.png"
    stale.write_bytes(b"old")
    before = (out / "summary.json").read_text()
    code, err = in_process(main, [*PHANTOM, f"output_dir={out}", "sampler=tv", "tv.max_iterations=20"], capsys)
    assert code == 2 and "overwrite=true" in one_line(err)
    assert (out / "summary.json").read_text() == before and stale.exists()  # nothing of the earlier run touched
    assert "tv" not in (out / ".hydra" / "config.yaml").read_text().split("sampler:")[1][:200]
    code, _ = in_process(main, [*PHANTOM, f"output_dir={out}", "sampler=tv", "tv.max_iterations=20",
                                "overwrite=true"], capsys)
    assert code == 0 and not stale.exists() and "tv" in json.loads((out / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- signals
def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before the signal: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("never reached the point to signal")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, float, str]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, time.monotonic() - t0, err


def test_sigterm_stops_reconstruct_keeps_what_is_complete_and_a_rerun_completes(tiny_prior, tmp_path):
    out = tmp_path / "out"
    args = ["data=phantom", "data.image_size=32", "physics.image_size=32", "data.num_test=8", "data.predict_split=test",
            "data.batch_size=1", "sampler=ldir", f"prior.path={tiny_prior}", "tv.max_iterations=20",
            f"output_dir={out}", "progress=false"]
    proc = start("reconstruct", *args, "sampler.num_steps=2", "sampler.guidance.final_steps=600")
    part = out / "parts" / "rank0.jsonl"
    wait_for(lambda: part.is_file() and part.read_text().strip(), proc)
    code, seconds, err = stop(proc)
    assert code == 143 and seconds < 5, (code, seconds, err[-2000:])
    status = json.loads((out / "run_info.json").read_text())
    assert status["status"] == "interrupted" and "SIGTERM" in status["error"] and status["images_done"] >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ldir"]["n"] == status["images_done"] < 8  # the complete images, reported
    done = run("reconstruct", *args, "sampler.num_steps=2", "sampler.guidance.final_steps=2", "overwrite=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run_info.json").read_text())["status"] == "complete"
    assert json.loads((out / "summary.json").read_text())["ldir"]["n"] == 8


def test_sigint_exits_130(tiny_prior, tmp_path):
    out = tmp_path / "out"
    proc = start("sample", f"prior.path={tiny_prior}", "num_images=1000", "num_steps=1000", f"output_dir={out}",
                 "progress=false")
    wait_for(lambda: (out / "run_info.json").is_file(), proc)
    time.sleep(1.0)
    code, seconds, _ = stop(proc, signal.SIGINT)
    assert code == 130 and seconds < 5
    assert json.loads((out / "run_info.json").read_text())["status"] == "interrupted"
    assert not (out / "samples.png").exists()


def test_sigterm_stops_sample_and_a_rerun_completes(tiny_prior, tmp_path):
    out = tmp_path / "out"
    proc = start("sample", f"prior.path={tiny_prior}", "num_images=1000", "num_steps=1000", f"output_dir={out}",
                 "progress=false")
    wait_for(lambda: (out / "run_info.json").is_file(), proc)
    time.sleep(1.0)
    code, seconds, err = stop(proc)
    assert code == 143 and seconds < 5, err[-2000:]
    assert json.loads((out / "run_info.json").read_text())["status"] == "interrupted"
    done = run("sample", f"prior.path={tiny_prior}", "num_images=2", "num_steps=2", f"output_dir={out}",
               "overwrite=true", "progress=false")
    assert done.returncode == 0 and (out / "samples.png").is_file(), done.stderr[-2000:]


def test_sigterm_stops_training_with_a_checkpoint_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["experiment=demo", "debug=tiny", "stage=vae", f"output_dir={out}", "logger=csv"]
    proc = start("train", *args, "stages.vae.trainer.max_epochs=100000")
    wait_for(lambda: (out / "vae" / "checkpoints" / "last.ckpt").is_file(), proc)  # an epoch in
    code, seconds, err = stop(proc)
    assert code == 143 and seconds < 5, err[-2000:]
    assert json.loads((out / "run_info.json").read_text())["status"] == "interrupted"
    last = out / "vae" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] > 0
    refused = run("train", *args)
    assert refused.returncode == 2 and "overwrite=true" in refused.stderr
    # the stop may come at an epoch's end (Lightning's check) or inside one (ours): resume for one more epoch
    done = run("train", *args, "ckpt_path=last", f"stages.vae.trainer.max_epochs={state['epoch'] + 1}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run_info.json").read_text())["status"] == "complete"


def test_lightnings_own_sigterm_exit_is_the_interrupt_and_checkpoints(tmp_path):
    """Lightning checks SIGTERM itself (at epoch ends and batch starts) and leaves by ``SIGTERMException``, a
    ``SystemExit`` with status 0. When its check comes before ours, the run must still save ``last.ckpt``, be marked
    interrupted and exit 143; a ``SystemExit`` without a stop request passes through unchanged."""
    import pytorch_lightning as pl
    from test_vae import smooth_images
    from tiny import tiny_module
    from torch.utils.data import DataLoader

    from ldir_pl import interrupt
    from ldir_pl.apps.cli import command_run
    from ldir_pl.models.stop_on_signal import StopOnSignal

    class LightningSeesItFirst(pl.Callback):
        """A SIGTERM arriving after our batch-end check: only Lightning's next check can see it."""

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                interrupt.request(signal.SIGTERM)
                trainer._signal_connector.received_sigterm = True

    loader = DataLoader(smooth_images(8), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StopOnSignal(tmp_path / "ckpt"), LightningSeesItFirst()])
    with pytest.raises(SystemExit) as exit_info:
        with command_run("ldir-train", tmp_path / "run"):
            trainer.fit(tiny_module("vae"), loader)
    assert exit_info.value.code == 143 and trainer.global_step == 2
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["status"] == "interrupted"
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    with pytest.raises(SystemExit) as exit_info:
        with command_run("ldir-train"):
            sys.exit(3)
    assert exit_info.value.code == 3


# ---------------------------------------------------------------------------------------------- atomic outputs
def test_a_crash_while_writing_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    import nibabel as nib

    from ldir_pl.atomic import atomic_path
    from ldir_pl.data.dicom_out import write_dicom_series
    from ldir_pl.data.nifti import read_nifti, write_nifti

    hu = np.full((4, 16, 16), -1000, dtype=np.int16)
    hu[:, 4:12, 4:12] = 40
    nib.save(nib.Nifti1Image(np.moveaxis(hu, 0, -1), np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / "v.nii.gz")
    vol = read_nifti(tmp_path / "v.nii.gz")

    def half_then_crash(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b" + b"\0" * 100)  # a truncated gzip stream
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", half_then_crash)
    with pytest.raises(OSError):
        write_nifti(tmp_path / "out" / "v.nii.gz", vol, vol.images)
    assert list((tmp_path / "out").iterdir()) == []

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", lambda self, path, **kw: (_ for _ in ()).throw(
        OSError("disk full")) if str(path).endswith("0003.dcm") else Path(path).write_bytes(b"DICM"))
    with pytest.raises(OSError):
        write_dicom_series(tmp_path / "dicom" / "series", hu, vol.affine, "ldir 23 views")
    assert list((tmp_path / "dicom").iterdir()) == []  # not two files of a four-slice series

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "summary.json") as tmp:
        tmp.write_text('{"psnr": 3')
        raise RuntimeError("killed")
    assert not (tmp_path / "summary.json").exists() and not list(tmp_path.glob(".partial-*"))


def test_dicom_slices_out_keep_the_input_study_and_geometry(tmp_path, capsys):
    from ldir_pl.apps.reconstruct import main

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "CT_small.dcm")
    source = pydicom.dcmread(tmp_path / "CT_small.dcm")
    code, err = in_process(main, ["data=dicom", f"data.root={tmp_path}", "data.val_fraction=0", "data.test_fraction=0",
                                  "data.image_size=64", "physics.image_size=64", "sampler=fbp", "recon.dicom=true",
                                  f"output_dir={tmp_path / 'out'}", "progress=false"], capsys)
    assert code == 0, err
    (path,) = (tmp_path / "out" / "dicom" / "fbp" / "CT_small").glob("*.dcm")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
    assert (ds.Rows, ds.Columns) == (64, 64) and np.allclose(ds.PixelSpacing, 2 * np.asarray(source.PixelSpacing))
    assert np.allclose(ds.ImageOrientationPatient, source.ImageOrientationPatient)
    # the first pixel centre of the 2x2-averaged image is half an input pixel inside the input's first centre
    shift = 0.5 * (float(source.PixelSpacing[0]) * np.asarray(source.ImageOrientationPatient[3:])
                   + float(source.PixelSpacing[1]) * np.asarray(source.ImageOrientationPatient[:3]))
    assert np.allclose(ds.ImagePositionPatient, np.asarray(source.ImagePositionPatient, dtype=float) + shift, atol=1e-4)
    recon = np.load(tmp_path / "out" / "reconstructions" / "fbp" / "CT_small.npy")
    assert np.abs(ds.pixel_array - (recon * 4096 - 1024)).max() <= 0.5 + 1e-3  # HU, rounded once


def test_panels_use_a_named_ct_window():
    from ldir_pl.apps.report import window_range
    from ldir_pl.errors import ConfigError

    lo, hi = window_range("soft_tissue")  # W400 / L40
    assert (lo * 4096 - 1024, hi * 4096 - 1024) == pytest.approx((-160.0, 240.0))
    assert window_range("lung")[0] * 4096 - 1024 == pytest.approx(-1350.0)
    with pytest.raises(ConfigError, match="recon.window"):
        window_range("liver")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_debug_tiny_composes_and_builds_on_every_experiment(experiment):
    from hydra.utils import instantiate

    from ldir_pl.apps.train import compose_config
    from ldir_pl.models.latent_diffusion import build_unet

    cfg = compose_config([f"experiment={experiment}", "debug=tiny"])
    assert cfg.data.image_size == 32 and cfg.init_from is None
    vae = instantiate(cfg.model.vae, _convert_="all")
    factor = 2 ** (len(cfg.model.vae.autoencoder.block_out_channels) - 1)
    unet = build_unet(32 // factor, cfg.model.vae.autoencoder.latent_channels, **cfg.model.ldm.unet)
    pixel = build_unet(32, 1, **cfg.model.pixel_ddpm.unet)
    z = vae.vae.encode(torch.zeros(1, 1, 32, 32)).latent_dist.mode()
    assert unet(z, torch.tensor([10])).sample.shape == z.shape
    assert pixel(torch.zeros(1, 1, 32, 32), torch.tensor([10])).sample.shape == (1, 1, 32, 32)
    assert sum(p.numel() for p in unet.parameters()) < 2e5


def test_volume_runs_show_progress_and_progress_false_silences_it(tiny_prior, tmp_path):
    import nibabel as nib

    (tmp_path / "vols").mkdir()
    hu = np.full((32, 32, 6), -1000, dtype=np.int16)
    hu[8:24, 8:24] = 40
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / "vols" / "v.nii.gz"))
    args = ["data=nifti", f"data.root={tmp_path / 'vols'}", "data.image_size=32", "physics.image_size=32",
            "data.val_fraction=0", "recon.volume=true", "data.slices=4", "sampler=ldir3d", f"prior.path={tiny_prior}",
            "sampler.num_steps=2", "sampler.guidance.final_steps=2", "tv.max_iterations=20", "baselines=[fbp]"]
    shown = run("reconstruct", *args, f"output_dir={tmp_path / 'a'}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "ldir3d (4 images, 2 chunks)" in shown.stderr and "step" in shown.stderr  # the step bar: rate and ETA
    quiet = run("reconstruct", *args, f"output_dir={tmp_path / 'b'}", "progress=false")
    assert quiet.returncode == 0 and "ldir3d (" not in quiet.stderr
