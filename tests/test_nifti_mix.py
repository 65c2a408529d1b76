"""NIfTI volumes as a data source (nibabel files written here) and training on several sources at once."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from test_data import _write_dicom

from ldir_pl.apps.train import compose_config
from ldir_pl.data import DataError, DicomDataModule, MixDataModule, NiftiDataModule
from ldir_pl.data.transforms import hu_to_unit, resize_area


def _volume(seed: int, size: int = 32, slices: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.full((size, size, slices), -1000, dtype=np.int16)
    vol[4:-4, 4:-4] = rng.integers(-100, 300, (size - 8, size - 8, slices), dtype=np.int16)
    return vol


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), str(path))
    return path


def test_slices_along_last_axis_in_reference_units(tmp_path):
    vols = {f"vol{k}": _volume(k, slices=2 + k) for k in range(5)}
    for name, v in vols.items():
        _write(tmp_path / f"{name}.nii.gz", v)
    _write(tmp_path / "plain.nii", _volume(9, slices=1))
    dm = NiftiDataModule(root=str(tmp_path), image_size=16, val_fraction=0.2, test_fraction=0.2, seed=3)
    items = dict(dm.items("all"))
    assert len(items) == sum(v.shape[-1] for v in vols.values()) + 1
    x = items["vol3/0004"]()
    want = resize_area(hu_to_unit(torch.from_numpy(vols["vol3"][:, :, 4].astype(np.float32)))[None], 16)
    assert x.shape == (1, 16, 16) and torch.allclose(x, want)
    # whole volumes per split, disjoint, covering everything
    groups = {s: {i.split("/")[0] for i, _ in dm.items(s)} for s in ("train", "val", "test")}
    assert len(groups["val"]) == 1 and len(groups["test"]) == 1
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert set().union(*groups.values()) == {*vols, "plain"}
    again = NiftiDataModule(root=str(tmp_path), image_size=16, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert [i for i, _ in again.items("test")] == [i for i, _ in dm.items("test")]


@pytest.mark.parametrize("case, data, affine, words", [
    ("complex", np.ones((32, 32, 2), np.complex64), None, "not a real-valued scalar"),
    ("4d", np.zeros((32, 32, 2, 3), np.int16), None, "expected a 3-D volume"),
    ("thin", np.zeros((32, 4, 20), np.int16), None, "slices must lie along the last axis"),
    ("singular", _volume(0), "zero-sform", "affine is singular"),
    ("unit", np.random.default_rng(0).random((32, 32, 2)).astype(np.float32), None, "not Hounsfield units"),
    ("nan", np.where(np.eye(32)[..., None] > 0, np.nan, -1000.0 + 1500 * np.ones((32, 32, 2))).astype(np.float32),
     None, "NaN/inf"),
])
def test_bad_volumes_name_the_file(tmp_path, case, data, affine, words):
    if affine == "zero-sform":  # nibabel refuses to write a singular affine: patch the header's sform rows
        path = _write(tmp_path / f"{case}.nii", data)
        raw = bytearray(path.read_bytes())
        raw[252:256] = np.array([0, 1], "<i2").tobytes()   # qform_code 0, sform_code 1
        raw[280:328] = np.zeros(12, "<f4").tobytes()       # srow_x, srow_y, srow_z
        path.write_bytes(bytes(raw))
    else:
        path = _write(tmp_path / f"{case}.nii.gz", data, affine)
    with pytest.raises(DataError, match=words) as err:
        NiftiDataModule(root=str(tmp_path), image_size=32).setup()
    assert str(path) in str(err.value)


def test_empty_missing_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="no .nii / .nii.gz files"):
        NiftiDataModule(root=str(tmp_path)).setup()
    with pytest.raises(DataError, match="does not exist"):
        NiftiDataModule(root=str(tmp_path / "nope")).setup()
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match="broken.nii.gz: not a readable NIfTI"):
        NiftiDataModule(root=str(tmp_path)).setup()


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    dicom, vols = tmp_path / "ct-dicom", tmp_path / "ct-volumes"
    dicom.mkdir(), vols.mkdir()
    for k in range(10):
        _write_dicom(dicom / f"s{k}.dcm", patient=f"P{k // 2}", size=32, value=900 + 20 * k)
    names = ["v0", "v1", "v2", "rider-pilot_01", "cmb-crc_01", "lung-fused-ct-pathology_01"]  # 3 held out
    for k, name in enumerate(names):
        _write(vols / f"{name}.nii.gz", _volume(k, slices=4))
    return dicom, vols


def test_mix_trains_on_all_sources_and_evaluates_on_one(tmp_path):
    dicom, vols = _sources(tmp_path)
    cfg = compose_config(["data=ct_mix", f"paths.data_dir={tmp_path}", "data.image_size=32"])
    dm = instantiate(cfg.data, _convert_="all")
    alone = instantiate(compose_config(["data=dicom", f"data.root={dicom}", "data.image_size=32"]).data)
    assert isinstance(dm, MixDataModule)
    train = [i for i, _ in dm.items("train")]
    assert sum(i.startswith("volumes:") for i in train) == 12          # every volume but the held-out ones trains
    assert not any(h in i for i in train for h in ("rider-pilot", "cmb-crc", "lung-fused"))
    volumes = instantiate(compose_config(["data=ct_volumes", f"paths.data_dir={tmp_path}", "data.image_size=32"]).data)
    assert {i.split("/")[0] for i, _ in volumes.items("test")} == {"rider-pilot_01", "cmb-crc_01"}
    assert {i.split("/")[0] for i, _ in volumes.items("val")} == {"lung-fused-ct-pathology_01"}
    assert {i for i in train if i.startswith("dicom:")} == {f"dicom:{i}" for i, _ in alone.items("train")}
    for split in ("val", "test"):
        assert [i for i, _ in dm.items(split)] == [i for i, _ in alone.items(split)]
        assert dm.items(split)  # 5 patients: one each for validation and test
    assert not alone.patients("test") & alone.patients("train")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape[1:] == (1, 32, 32)


def test_mix_errors(tmp_path):
    dicom, vols = _sources(tmp_path)
    src = {"dicom": DicomDataModule(root=str(dicom), image_size=32),
           "volumes": NiftiDataModule(root=str(vols), image_size=16)}
    with pytest.raises(ValueError, match="data.eval_source='ct'"):
        MixDataModule(src, eval_source="ct", image_size=32)
    with pytest.raises(ValueError, match="data.sources.volumes.image_size=16"):
        MixDataModule(src, eval_source="dicom", image_size=32)


def test_shared_split_keeps_test_patients_apart(shared_dicom):
    """The ct-dicom split every table is reported on: 23 / 8 / 8 patients, fixed by the seed in conf/data."""
    dm = instantiate(compose_config(["data=dicom", f"data.root={shared_dicom}"]).data)
    train, val, test = (dm.patients(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (23, 8, 8)
    assert not (train & val) and not (train & test) and not (val & test)
    assert (len(dm.items("val")), len(dm.items("test"))) == (17, 21)
