"""Volumes: NIfTI and DICOM series in (sorted, checked), NIfTI out with the input's geometry, TV along z, and LDIR
on a volume in chunks, on small files the tests write themselves."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from tiny import NOISE, phantom, tiny_latent_bundle

from ldir_pl.config import load_sampler
from ldir_pl.data import DicomDataModule, NiftiDataModule
from ldir_pl.data.nifti import read_nifti, write_nifti
from ldir_pl.data.readers import DataError
from ldir_pl.data.volumes import read_dicom_series
from ldir_pl.physics import CTPhysics, VolumePhysics
from ldir_pl.sampling.tv import forward_diff, forward_diff_t

ROOT = Path(__file__).resolve().parents[1]


def phantom_hu(slices: int = 12, size: int = 32) -> np.ndarray:
    """(H, W, S) int16 HU: a body disc in air with a sphere of bone, varying along z."""
    z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                          indexing="ij")
    vol = np.where(x**2 + y**2 < 0.7, 40.0, -1000.0) + np.where((x - 0.2) ** 2 + y**2 + z**2 < 0.2, 700.0, 0.0)
    return np.moveaxis(vol, 0, -1).astype(np.int16)


def write_volume(path: Path, hu: np.ndarray, spacing=(1.5, 1.5, 3.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, -30.0, 120.0]
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return affine


def write_series(folder: Path, hu: np.ndarray, uid: str = "1.2.3.4", spacing: float = 2.5,
                 normal=(0.0, 0.0, 1.0), positions: list[float] | None = None, patient: str = "P1") -> list[Path]:
    """A DICOM series of the (H, W, S) HU array, slices at ``positions`` (mm along the normal), one file each,
    file names shuffled so their order says nothing; SliceThickness deliberately wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    row = np.cross([0.0, 1.0, 0.0], normal)
    row /= np.linalg.norm(row)
    col = np.cross(normal, row)
    positions = positions if positions is not None else [k * spacing for k in range(hu.shape[-1])]
    names = [f"img{k:03d}.dcm" for k in range(len(positions))]
    random.Random(0).shuffle(names)
    paths = []
    for k, (name, d) in enumerate(zip(names, positions)):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientID, ds.SeriesInstanceUID = patient, uid
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.ImagePositionPatient = [float(v) for v in np.array([10.0, -20.0, 30.0]) + d * normal]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 99.0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        arr = (hu[:, :, min(k, hu.shape[-1] - 1)].astype(np.int32) + 1024).astype(np.uint16)
        ds.Rows, ds.Columns = arr.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = arr.tobytes()
        ds.save_as(folder / name)
        paths.append(folder / name)
    return paths


def test_nifti_round_trip_keeps_affine_and_slab_and_resize_follow(tmp_path):
    hu = phantom_hu(12, 32)
    affine = write_volume(tmp_path / "v.nii.gz", hu)
    vol = read_nifti(tmp_path / "v.nii.gz")
    assert vol.images.shape == (12, 1, 32, 32) and np.allclose(vol.affine, affine)
    assert vol.spacing == pytest.approx((1.5, 1.5, 3.0)) and vol.z_ratio == pytest.approx(0.5)
    out = write_nifti(tmp_path / "out" / "v.nii.gz", vol, vol.images)
    back = nib.load(str(out))
    assert np.allclose(back.affine, affine) and back.header.get_zooms() == pytest.approx((1.5, 1.5, 3.0))
    assert np.array_equal(np.asanyarray(back.dataobj), hu)  # HU back exactly (within [-1024, 3072])
    # a slab keeps its place: its first voxel sits where slice 4 sat
    slab = vol.slab("4:10")
    assert slab.images.shape[0] == 6 and slab.slice_ids[0] == "v/0004"
    assert np.allclose(slab.affine @ [0, 0, 0, 1], affine @ [0, 0, 4, 1])
    assert vol.slab(4).slice_ids == ["v/0004", "v/0005", "v/0006", "v/0007"]  # the centred 4
    # 2x2 area-resizing: pixels twice as large, their centres between the old ones
    small = vol.resized(16)
    assert small.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert np.allclose(small.affine @ [0, 0, 0, 1], affine @ [0.5, 0.5, 0, 1])
    with pytest.raises(ValueError, match="data.slices='9:3'"):
        vol.slab("9:3")


def test_shuffled_dicom_series_is_sorted_back_with_spacing_from_positions(tmp_path):
    hu = phantom_hu(8, 32)
    write_series(tmp_path / "series", hu, spacing=2.5, normal=(0.0, 0.3, 1.0))  # tilted gantry
    (name, (patient, vol)), = read_dicom_series(tmp_path).items()
    assert name == "series" and patient == "P1"
    assert vol.spacing == pytest.approx((0.8, 0.8, 2.5), abs=1e-4)  # positions, not SliceThickness (99)
    expected = torch.from_numpy(np.moveaxis(hu, -1, 0).astype(np.float32) + 1024) / 4096
    assert torch.allclose(vol.images[:, 0], expected.clamp(0, 1), atol=1e-6)
    # in volume mode the data module serves it as one volume
    dm = DicomDataModule(root=str(tmp_path), image_size=16, val_fraction=0.0, test_fraction=0.0)
    (v,) = dm.volumes("all")
    assert v.images.shape == (8, 1, 16, 16) and v.spacing == pytest.approx((1.6, 1.6, 2.5), abs=1e-4)


@pytest.mark.parametrize("case,words", [
    ("missing", "missing slice"), ("duplicate", "duplicate slice position"), ("orientation", "mixed orientations"),
    ("size", "different sizes"),
])
def test_bad_series_are_refused_naming_series_and_file(tmp_path, case, words):
    hu = phantom_hu(6, 32)
    positions = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0] if case == "missing" else None
    positions = [0.0, 2.5, 5.0, 5.0, 7.5, 10.0] if case == "duplicate" else positions
    paths = write_series(tmp_path / "s", hu, uid="9.8.7", positions=positions)
    if case in ("orientation", "size"):
        ds = pydicom.dcmread(paths[2])
        if case == "orientation":
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        else:
            ds.Rows, ds.Columns = 16, 64
        ds.save_as(paths[2])
    with pytest.raises(DataError, match=words) as err:
        read_dicom_series(tmp_path)
    assert "9.8.7" in str(err.value) and ".dcm" in str(err.value)


def test_tv_z_gradient_is_adjoint():
    x, p = torch.rand(5, 1, 8, 6, dtype=torch.float64), torch.rand(5, 3, 8, 6, dtype=torch.float64)
    h, hz = (0.1, 0.2), 0.35
    lhs = (forward_diff(x, h, hz) * p).sum()
    rhs = (x * forward_diff_t(p, h, hz)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12)


def _volume_problem(n: int = 6):
    physics = VolumePhysics(CTPhysics(num_views=8, image_size=32, noise=NOISE), z_ratio=0.5)
    x = phantom(n)
    ids = [f"v/{k:04d}" for k in range(n)]
    return physics, x, ids, physics.measure(x, ids)


@pytest.mark.parametrize("name", ["ldir3d", "ldir3d_dds"])
def test_3d_ldir_is_the_same_volume_whatever_the_chunk(name):
    """The networks take `batch_size` slices at a time inside every step, while the z-coupled steps (the in-loop
    consistency, the 3-D refinement) see the whole slab, so there is no seam and nothing to blend: the chunk
    size only changes float round-off of differently sized convolutions (1e-6). The in-loop form re-encodes
    its estimate at every step, and the untrained test VAE amplifies that round-off, so it is held to a
    mean |difference| of 1e-4 and a largest one of 5e-3 (images in [0, 1])."""
    physics, x, ids, y = _volume_problem()
    bundle = tiny_latent_bundle()
    args = ["num_steps=3", "tv.max_iterations=40"]
    out = {c: load_sampler(name, bundle, [*args, f"batch_size={c}"]).reconstruct(y, physics, ids) for c in (2, 4, 6)}
    for c in (2, 4):
        diff = (out[c] - out[6]).abs()
        if name == "ldir3d":
            assert float(diff.max()) < 1e-5
        else:
            assert float(diff.mean()) < 1e-4 and float(diff.max()) < 5e-3
    assert out[6].shape == x.shape and torch.isfinite(out[6]).all()


def test_3d_methods_refuse_slices_without_a_volume():
    physics = CTPhysics(num_views=8, image_size=32, noise=NOISE)
    y = physics.measure(phantom(2), [0, 1])
    with pytest.raises(ValueError, match="recon.volume=true"):
        load_sampler("tv3d", overrides=["tv.max_iterations=5"]).reconstruct(y, physics, [0, 1])


def read_series(folder: Path) -> list:
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def test_volume_mode_end_to_end_nifti_and_dicom_series(tmp_path):
    """Volumes in (NIfTI, a DICOM series), NIfTI and DICOM series out: the DICOM series reads back with the same
    positions, orientation, spacing and HU (to 1 HU) as the NIfTI output, in the input's study."""
    hu = phantom_hu(12, 32)
    affine = write_volume((tmp_path / "nifti").mkdir() or tmp_path / "nifti" / "vol.nii.gz", hu)
    img = nib.load(str(tmp_path / "nifti" / "vol.nii.gz"))
    img.set_qform(affine, code=1)  # a scanner-anatomical qform and an aligned sform: both must survive
    img.set_sform(affine, code=2)
    nib.save(img, str(tmp_path / "nifti" / "vol.nii.gz"))
    series = write_series(tmp_path / "dicom" / "patient1", hu)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for source in ("nifti", "dicom"):
        out = tmp_path / f"out_{source}"
        proc = subprocess.run(
            [sys.executable, "-m", "ldir_pl.apps.reconstruct", f"data={source}", f"data.root={tmp_path / source}",
             "data.image_size=32", "data.val_fraction=0", "data.test_fraction=0", "data.slices=10",
             "recon.volume=true", "recon.dicom=true", "physics.num_views=12", "sampler=tv3d", "baselines=[fbp,tv]",
             "tv.max_iterations=60", f"output_dir={out}", "progress=false"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        name = "vol" if source == "nifti" else "patient1"
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary) == {"fbp", "tv", "tv3d"} and summary["tv3d"]["n"] == 1
        assert summary["tv3d"]["psnr_coronal"] > summary["fbp"]["psnr_coronal"]
        header = (out / "metrics.csv").read_text().splitlines()[0]
        assert header.startswith("id,method,psnr,ssim") and "psnr_coronal" in header and "psnr_sagittal" in header
        assert (out / "panels" / f"{name}.png").exists()
        for method in summary:
            img = nib.load(str(out / "volumes" / method / f"{name}.nii.gz"))
            assert img.shape == (32, 32, 10) and img.get_data_dtype() == np.int16
            if source == "nifti":  # the centred 10 of 12 slices: the input's affine, one slice up; its codes
                assert np.allclose(img.affine, affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1],
                                                                 [0, 0, 0, 1]]))
                assert (int(img.header["sform_code"]), int(img.header["qform_code"])) == (2, 1)
            dicom = read_series(out / "dicom" / method / name)
            assert len(dicom) == 10 and {d.SOPClassUID for d in dicom} == {"1.2.840.10008.5.1.4.1.1.2"}
            assert len({d.SeriesInstanceUID for d in dicom}) == 1 and method in dicom[0].SeriesDescription
            assert "12 views" in dicom[0].SeriesDescription
            # geometry: voxel (0, 0, k) of the NIfTI output, in LPS, is ImagePositionPatient of slice k
            lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
            for k, d in enumerate(dicom):
                assert np.allclose(d.ImagePositionPatient, lps[:3, 3] + k * lps[:3, 2], atol=1e-3)
                hu_back = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                assert np.abs(hu_back - np.asarray(img.dataobj)[:, :, k]).max() <= 1
            assert np.allclose(dicom[0].PixelSpacing, np.linalg.norm(img.affine[:3, :2], axis=0), atol=1e-4)
            row_dir = np.asarray(dicom[0].ImageOrientationPatient[:3])
            assert np.allclose(row_dir, lps[:3, 1] / np.linalg.norm(lps[:3, 1]), atol=1e-6)
            if source == "dicom":  # the input's patient and study; positions are the input slices' (slab 1..10)
                source_ds = pydicom.dcmread(series[0])
                assert {d.StudyInstanceUID for d in dicom} == {source_ds.StudyInstanceUID}
                assert dicom[0].PatientID == "P1" and dicom[0].SeriesInstanceUID != source_ds.SeriesInstanceUID
                z = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in series)[1:11]
                assert np.allclose([float(d.ImagePositionPatient[2]) for d in dicom], z, atol=1e-3)


def test_nifti_data_module_slab_and_volumes(tmp_path):
    write_volume(tmp_path / "a.nii.gz", phantom_hu(12, 32))
    dm = NiftiDataModule(root=str(tmp_path), image_size=32, val_fraction=0.0, slices="2:5")
    assert [i for i, _ in dm.items("train")] == ["a/0002", "a/0003", "a/0004"]
    (vol,) = dm.volumes("train")
    assert vol.images.shape[0] == 3 and vol.first == 2


def test_centred_slab_cuts_only_the_split_it_serves(tmp_path):
    """A held-out volume's slab may be longer than a training volume; only a volume that is served and too
    short is refused, naming the file."""
    write_volume(tmp_path / "long.nii.gz", phantom_hu(12, 32))
    write_volume(tmp_path / "short.nii.gz", phantom_hu(4, 32))
    dm = NiftiDataModule(root=str(tmp_path), image_size=32, val_fraction=0.0, test_volumes=["long"], slices=8)
    (vol,) = dm.volumes("test")
    assert vol.images.shape[0] == 8 and vol.first == 2
    with pytest.raises(Exception, match="short"):
        dm.volumes("train")
