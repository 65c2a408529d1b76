"""What a GPU machine without network access trains from: one packed file of the training slices (int16 HU, ids,
patients / volumes) that ``data=packed`` serves exactly as the sources it came from."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ldir_pl.data import NiftiDataModule, PackedDataModule
from ldir_pl.data.packed import pack
from ldir_pl.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def volumes(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        hu = rng.integers(-1024, 3000, size=(32, 32, 5)).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), str(folder / f"v{k}.nii.gz"))
    return folder


def test_packed_file_serves_the_same_images_splits_and_groups(tmp_path):
    source = NiftiDataModule(root=str(volumes(tmp_path / "vols")), image_size=32, val_volumes=["v1"], val_fraction=0)
    counts = pack(tmp_path / "p.npz", source)
    assert counts == {"train": 10, "val": 5}
    packed = PackedDataModule(path=str(tmp_path / "p.npz"), image_size=32)
    for split in ("train", "val"):
        a, b = source.items(split), packed.items(split)
        assert [i for i, _ in a] == [i for i, _ in b]
        diff = max(float((la() - lb()).abs().max()) for (_, la), (_, lb) in zip(a, b))
        assert diff <= 0.5 / 4096 + 1e-7  # rounded to whole HU, nothing else
        assert packed.groups(split) == source.groups(split)
    assert packed.items("test") == [] and packed.groups("train") == {"v0", "v2"}
    raw = 15 * 32 * 32 * 2
    assert (tmp_path / "p.npz").stat().st_size < 1.2 * raw  # random HU barely compress; CT does (about a third)


def test_bad_packed_files_are_named(tmp_path):
    with pytest.raises(InputError, match="no packed data file"):
        PackedDataModule(path=str(tmp_path / "none.npz")).setup()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.npz"):
        PackedDataModule(path=str(tmp_path / "bad.npz")).setup()


def test_pack_script_then_training_from_the_pack(tmp_path, monkeypatch):
    """The script packs a data config's train / val splits and writes the command; ``data=packed`` trains."""
    from ldir_pl.apps.train import compose_config, train_prior

    vols = volumes(tmp_path / "vols", 4)
    out = tmp_path / "gpu_run"
    monkeypatch.setattr(sys, "argv", ["pack_gpu_run.py", "--out", str(out), "--data", "nifti", "--",
                                      f"data.root={vols}", "data.image_size=32"])
    runpy.run_path(str(ROOT / "experiments" / "pack_gpu_run.py"), run_name="__main__")
    assert (out / "ct_train.npz").is_file() and "data=packed" in (out / "train.sh").read_text()
    cfg = compose_config(["experiment=demo", "debug=tiny", "data=packed", f"data.path={out / 'ct_train.npz'}",
                          "data.image_size=32", f"output_dir={tmp_path / 'run'}", "logger=none", "stage=vae"])
    train_prior(cfg)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["vae"]["val/psnr"] > 0 and torch.isfinite(torch.tensor(summary["vae"]["val/psnr"]))
