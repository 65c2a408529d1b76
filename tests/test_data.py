from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from tiny import NOISE

from ldir_pl.data import (
    DataError,
    DicomDataModule,
    FolderDataModule,
    LoDoPaBDataModule,
    PhantomDataModule,
    SinogramDataModule,
)
from ldir_pl.data.readers import read_dicom
from ldir_pl.data.transforms import Augment, hu_to_unit, resize_area
from ldir_pl.physics import CTPhysics

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def _write_dicom(path: Path, patient: str, size: int = 64, value: int = 1000) -> None:
    ds = pydicom.dcmread(CT_SMALL)
    ds.PatientID = patient
    arr = np.full((size, size), value, dtype=np.int16)
    arr[size // 4: size // 2, size // 4: size // 2] = value + 200
    ds.Rows, ds.Columns = size, size
    ds.PixelData = arr.tobytes()
    ds.save_as(path)


def test_ct_small_reads_hu():
    s = read_dicom(CT_SMALL)
    ds = pydicom.dcmread(CT_SMALL)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(s.hu, expected)
    assert s.patient_id == str(ds.PatientID)


def test_transforms():
    hu = torch.tensor([-2000.0, -1024.0, 0.0, 3072.0, 5000.0])
    assert torch.allclose(hu_to_unit(hu), torch.tensor([0.0, 0.0, 0.25, 1.0, 1.0]))
    img = torch.arange(16.0).reshape(1, 4, 4)
    assert torch.allclose(resize_area(img, 2), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    x = torch.rand(1, 32, 32)
    out = Augment(hflip=1.0, max_rotation_deg=0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flip(-1))


def test_dicom_folder_split_by_patient(tmp_path):
    for p in range(5):
        for s in range(3):
            _write_dicom(tmp_path / f"p{p}_s{s}.dcm", patient=f"P{p}")
    (tmp_path / "README.txt").write_text("not a slice")
    dm = DicomDataModule(root=str(tmp_path), image_size=32, batch_size=4, val_fraction=0.4, seed=3)
    dm.setup()
    train, val = dm.patients("train"), dm.patients("val")
    assert train and val and not (train & val)
    assert len(dm.items("all")) == 15
    assert len(dm.items("train")) == 3 * len(train)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 1, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    dm.attach_physics(CTPhysics(num_views=8, image_size=32, noise=NOISE))
    pb = next(iter(dm.predict_dataloader()))
    assert pb["y"].shape == (4, 1, 8, dm.physics.meas_shape[1]) and len(pb["id"]) == 4


def test_dicom_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DicomDataModule(root=str(tmp_path / "missing")).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .* files found"):
        DicomDataModule(root=str(empty)).setup()
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_dicom(bad / "ok.dcm", "P0")
    (bad / "broken.dcm").write_bytes(b"this is not dicom at all" * 10)
    with pytest.raises(DataError, match="broken.dcm.*not a readable DICOM"):
        DicomDataModule(root=str(bad)).setup()
    noimg = tmp_path / "noimg"
    noimg.mkdir()
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(noimg / "report.dcm")
    with pytest.raises(DataError, match="report.dcm.*no image"):
        DicomDataModule(root=str(noimg)).setup()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_dicom(mixed / "a.dcm", "P0", size=64)
    _write_dicom(mixed / "b.dcm", "P1", size=32)
    with pytest.raises(DataError, match=r"mixed image sizes.*\(64, 64\).*b.dcm.*\(32, 32\)"):
        DicomDataModule(root=str(mixed)).setup()


def test_shared_ct_slices(shared_dicom):
    dm = DicomDataModule(root=str(shared_dicom), image_size=256, seed=0)
    dm.setup()
    assert len(dm.items("all")) == 80
    assert not (dm.patients("train") & dm.patients("val"))
    x = dm.items("all")[0][1]()
    assert x.shape == (1, 256, 256) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and x.std() > 0.05


def test_phantoms_are_seeded():
    a = PhantomDataModule(image_size=32, num_train=3, seed=1).items("train")
    b = PhantomDataModule(image_size=32, num_train=3, seed=1).items("train")
    c = PhantomDataModule(image_size=32, num_train=3, seed=2).items("train")
    assert torch.equal(a[0][1](), b[0][1]())
    assert not torch.equal(a[0][1](), c[0][1]())
    assert not torch.equal(a[0][1](), a[1][1]())
    x = a[0][1]()
    assert x.shape == (1, 32, 32) and x.min() >= 0 and x.max() <= 1 and x.max() > 0.1


def test_image_folder_formats(tmp_path):
    from PIL import Image

    np.save(tmp_path / "a.npy", np.random.rand(40, 40).astype(np.float32))
    Image.fromarray((np.random.rand(40, 40) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    import tifffile

    tifffile.imwrite(tmp_path / "c.tif", (np.random.rand(40, 40) * 65535).astype(np.uint16))
    dm = FolderDataModule(root=str(tmp_path), image_size=20, val_fraction=0.34)
    dm.setup()
    assert len(dm.items("all")) == 3
    assert next(iter(dm.train_dataloader())).shape[1:] == (1, 20, 20)
    np.save(tmp_path / "hu.npy", np.full((40, 40), 500.0, dtype=np.float32))
    with pytest.raises(DataError, match="hu.npy.*intensity=hu"):
        FolderDataModule(root=str(tmp_path)).setup()


def _lodopab(root: Path, split: str = "test", n: int = 3) -> None:
    with h5py.File(root / f"ground_truth_{split}_000.hdf5", "w") as f:
        f["data"] = np.random.rand(n, 362, 362).astype(np.float32)


def test_lodopab_reader(tmp_path):
    _lodopab(tmp_path, "train", 4)
    _lodopab(tmp_path, "test", 2)
    dm = LoDoPaBDataModule(root=str(tmp_path), image_size=64, batch_size=2)
    assert next(iter(dm.train_dataloader())).shape == (2, 1, 64, 64)
    dm.attach_physics(CTPhysics(num_views=10, image_size=64, noise=NOISE))
    assert len(next(iter(dm.predict_dataloader()))["id"]) == 2
    with h5py.File(tmp_path / "ground_truth_validation_000.hdf5", "w") as f:
        f["images"] = np.zeros((1, 8, 8))
    with pytest.raises(DataError, match="ground_truth_validation_000.hdf5.*no dataset 'data'"):
        next(iter(LoDoPaBDataModule(root=str(tmp_path)).val_dataloader()))


def test_sinogram_files_checked_against_geometry(tmp_path):
    p = CTPhysics(num_views=10, image_size=32, noise=NOISE)
    good = tmp_path / "good"
    good.mkdir()
    np.save(good / "scan.npy", np.random.rand(2, *p.meas_shape).astype(np.float32))
    dm = SinogramDataModule(root=str(good), image_size=32)
    dm.attach_physics(p)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["y"].shape == (2, 1, *p.meas_shape) and "x" not in batch
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "wrong.npy", np.random.rand(12, p.meas_shape[1]).astype(np.float32))
    dm = SinogramDataModule(root=str(bad), image_size=32)
    dm.attach_physics(p)
    with pytest.raises(ValueError, match=r"wrong.npy: measurement shape \(1, 12, \d+\) does not match"):
        dm.predict_dataloader()
