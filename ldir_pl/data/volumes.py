"""CT volumes: a stack of axial slices with the geometry needed to write it back where it came from.

A ``Volume`` holds its slices as the networks and operators see them ((S,1,H,W) in [0, 1] by the
reference transform, resized to ``image_size``) and the voxel-to-world affine of exactly those voxels
(RAS, as NIfTI stores it), so a reconstruction is written with the input's orientation, spacing and
position. Volumes come from NIfTI files (slices along the last axis) or DICOM series (grouped by
SeriesInstanceUID, sorted along the slice normal, spacing from ImagePositionPatient).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldir_pl.data.readers import CT_MODALITIES, DataError, check_modality, dicom_hu, open_dicom
from ldir_pl.data.transforms import HU_OFFSET, HU_SCALE, hu_to_unit, resize_area
from ldir_pl.errors import ConfigError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """``images`` (S,1,H,W) in [0, 1]; ``affine`` maps voxel (row, column, slice) to RAS millimetres."""

    name: str
    images: Tensor
    affine: np.ndarray
    source: str
    first: int = 0  # index of images[0] in the source volume (ids and noise seeds keep it)
    files: tuple[Path, ...] = ()  # a DICOM series' files in slice order (their patient and study go to DICOM out)
    nifti_codes: tuple[int, int] = (1, 1)  # (sform_code, qform_code) NIfTI out writes: the input's, or scanner

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(row, column, slice) spacing in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))

    @property
    def z_ratio(self) -> float:
        """In-plane over slice spacing: the weight of a z-difference against an in-plane one."""
        row, col, z = self.spacing
        return float(np.sqrt(row * col) / z)

    @property
    def slice_ids(self) -> list[str]:
        return [f"{self.name}/{self.first + k:04d}" for k in range(self.images.shape[0])]

    def slab(self, slices: str | int | None) -> Volume:
        """``"START:STOP"`` (Python slice of slice indices), an int N (the centred N slices), or None (all)."""
        start, stop = slab_bounds(slices, self.images.shape[0], self.source)
        affine = self.affine.copy()
        affine[:3, 3] += start * affine[:3, 2]
        return replace(self, images=self.images[start:stop], affine=affine, first=self.first + start,
                       files=self.files[start:stop])

    def resized(self, size: int) -> Volume:
        """Slices area-resized to ``size`` x ``size``; the affine follows (cell centres move with the cells)."""
        h, w = self.images.shape[-2:]
        if (h, w) == (size, size):
            return self
        fr, fc = h / size, w / size
        affine = self.affine.copy()
        affine[:3, 3] += (fr - 1) / 2 * affine[:3, 0] + (fc - 1) / 2 * affine[:3, 1]
        affine[:3, 0] *= fr
        affine[:3, 1] *= fc
        return replace(self, images=resize_area(self.images, size), affine=affine)

    def to_hu(self, images: Tensor) -> np.ndarray:
        """(S,1,H,W) images in [0, 1] -> (H, W, S) int16 HU, the inverse of the reference transform."""
        hu = images.detach().float().cpu().numpy()[:, 0] * HU_SCALE - HU_OFFSET
        return np.ascontiguousarray(np.moveaxis(np.rint(hu), 0, -1)).astype(np.int16)


def slab_bounds(slices: str | int | None, n: int, source: str) -> tuple[int, int]:
    if slices is None or slices == "":
        return 0, n
    if isinstance(slices, int) or (isinstance(slices, str) and slices.strip().isdigit()):
        k = int(slices)
        if not 1 <= k <= n:
            raise ConfigError(f"data.slices={slices}: {source} has {n} slices")
        start = (n - k) // 2
        return start, start + k
    parts = str(slices).split(":")
    if len(parts) != 2:
        raise ConfigError(f"data.slices={slices!r}: expected START:STOP or a slice count")
    start, stop, _ = slice(*(int(p) if p.strip() else None for p in parts)).indices(n)
    if stop <= start:
        raise ConfigError(f"data.slices={slices!r} selects no slice of {source} ({n} slices)")
    return start, stop


# ---------------------------------------------------------------------------------------------- DICOM
@dataclass(frozen=True)
class _Slice:
    path: Path
    position: np.ndarray       # ImagePositionPatient (LPS mm)
    orientation: np.ndarray    # ImageOrientationPatient: row direction, column direction
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    hu: np.ndarray


def _read_series_slice(path: Path, modalities: tuple[str, ...]) -> tuple[str, str, _Slice]:
    ds = open_dicom(path)
    check_modality(ds, path, modalities)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise DataError(f"{path}: DICOM file has no {tag}, so it cannot be placed in a volume")
    hu = dicom_hu(ds, path)
    uid = str(getattr(ds, "SeriesInstanceUID", "") or "unknown-series")
    return uid, str(getattr(ds, "PatientID", "") or ""), _Slice(
        path, np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
        (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), hu)


def _series_volume(uid: str, slices: list[_Slice], name: str) -> Volume:
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise DataError(f"DICOM series {uid}: mixed orientations: {first.path.name} is "
                            f"{first.orientation.round(4).tolist()} but {s.path} is {s.orientation.round(4).tolist()}")
        if s.hu.shape != first.hu.shape:
            raise DataError(f"DICOM series {uid}: slices of different sizes: {first.path.name} is {first.hu.shape} "
                            f"but {s.path} is {s.hu.shape}")
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4):
            raise DataError(f"DICOM series {uid}: pixel spacing {s.spacing} of {s.path} differs from "
                            f"{first.spacing} of {first.path.name}")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    order = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([float(s.position @ normal) for s in order])
    steps = np.diff(depth)
    if len(order) > 1:
        dup = int(np.argmin(steps))
        if steps[dup] < 1e-3:
            raise DataError(f"DICOM series {uid}: duplicate slice position {depth[dup]:.3f} mm in "
                            f"{order[dup].path} and {order[dup + 1].path}")
        median = float(np.median(steps))
        gap = int(np.argmax(steps))
        if steps[gap] > 1.5 * median:
            raise DataError(f"DICOM series {uid}: missing slice(s) between {order[gap].path.name} and "
                            f"{order[gap + 1].path.name} ({steps[gap]:.2f} mm apart, median spacing {median:.2f} mm)")
        dz = median
    else:
        dz = 1.0
    pr, pc = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = pr * col_dir   # down the rows: the column direction
    lps[:3, 1] = pc * row_dir   # along a row
    lps[:3, 2] = dz * normal
    lps[:3, 3] = order[0].position
    hu = np.stack([s.hu for s in order])  # (S, H, W)
    images = hu_to_unit(torch.from_numpy(hu.astype(np.float32))).unsqueeze(1)
    return Volume(name, images, LPS_TO_RAS @ lps, f"DICOM series {uid}", files=tuple(s.path for s in order))


def read_dicom_series(root: Path, modalities: tuple[str, ...] = CT_MODALITIES) -> dict[str, tuple[str, Volume]]:
    """Every series under ``root``: name -> (patient id, volume). Names are the series folder (or the UID when
    several series share a folder); files of other modalities than ``modalities`` are refused."""
    from ldir_pl.data.readers import DICOM_SUFFIXES, list_files

    groups: dict[str, list[_Slice]] = defaultdict(list)
    patients: dict[str, str] = {}
    folders: dict[str, set[Path]] = defaultdict(set)
    for path in list_files(root, DICOM_SUFFIXES, f"DICOM folder {root}"):
        uid, patient, s = _read_series_slice(path, modalities)
        groups[uid].append(s)
        patients[uid] = patient
        folders[uid].add(path.parent)
    out = {}
    for uid, slices in sorted(groups.items()):
        folder = sorted(folders[uid])[0]
        shared = sum(folder in f for f in folders.values()) > 1
        name = uid if shared or folder == root else str(folder.relative_to(root))
        out[name] = (patients[uid], _series_volume(uid, slices, name))
    return out


__all__ = ["Volume", "read_dicom_series", "slab_bounds"]
