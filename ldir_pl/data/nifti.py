"""A folder of axial CT volumes in NIfTI (``.nii`` / ``.nii.gz``), sliced along the last axis, split by volume.

Adjacent slices of one volume are near copies, so whole volumes (patients) go to train / val / test.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldir_pl.atomic import atomic_path
from ldir_pl.data.base import Item, SliceDataModule, StoredImage, split_by_group
from ldir_pl.data.readers import DataError, require_dir
from ldir_pl.data.transforms import hu_to_unit
from ldir_pl.data.volumes import Volume
from ldir_pl.errors import ConfigError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: HU outside this range means the file is not stored in Hounsfield units (e.g. already scaled to [0, 1]).
PLAUSIBLE_HU = (-2048.0, 32767.0)


def volume_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_volumes(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"NIfTI folder {root}: no .nii / .nii.gz files found")
    return files


def read_volume(path: Path) -> np.ndarray:
    """(H, W, S) float32 HU array of one volume; refuses files whose dtype, shape or affine make no sense."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        affine = np.asarray(img.affine, dtype=np.float64)
        dtype = img.get_data_dtype()
        raw = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types; re-raised naming the file
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if dtype.names is not None or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise DataError(f"{path}: voxel type {dtype} is not a real-valued scalar (RGB/complex volumes are not CT)")
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = raw[..., None]
    if raw.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume (H, W, slices), got shape {raw.shape}")
    if min(raw.shape[:2]) < 16:
        raise DataError(f"{path}: in-plane size {raw.shape[:2]} is too small for an axial CT slice; "
                        "slices must lie along the last axis")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{path}: affine is singular or not finite ({affine[:3, :3].tolist()}); "
                        "the file's geometry is broken")
    hu = raw.astype(np.float32)
    if not np.isfinite(hu).all():
        raise DataError(f"{path}: volume holds {int((~np.isfinite(hu)).sum())} NaN/inf voxels")
    lo, hi = float(hu.min()), float(hu.max())
    if lo < PLAUSIBLE_HU[0] or hi > PLAUSIBLE_HU[1] or hi - lo < 100:
        raise DataError(f"{path}: values span [{lo:.4g}, {hi:.4g}], not Hounsfield units "
                        f"(expected air near -1000 and tissue up to a few thousand)")
    return hu


def read_nifti(path: Path) -> Volume:
    """A NIfTI volume (HU, slices along the last axis) as a ``Volume`` at its own size."""
    import nibabel as nib

    hu = read_volume(path)  # (H, W, S), checked
    header = nib.load(str(path)).header
    affine = np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    images = hu_to_unit(torch.from_numpy(np.ascontiguousarray(np.moveaxis(hu, -1, 0)))).unsqueeze(1)
    codes = (int(header["sform_code"]), int(header["qform_code"]))
    return Volume(volume_name(path), images, affine, str(path), nifti_codes=codes)


def write_nifti(path: Path, volume: Volume, images: Tensor) -> Path:
    """``images`` (S,1,H,W) in [0, 1] of ``volume``'s voxels, written as int16 HU with its affine."""
    import nibabel as nib

    if tuple(images.shape) != tuple(volume.images.shape):
        raise ConfigError(f"{path}: images of shape {tuple(images.shape)} do not match volume {volume.name} "
                          f"{tuple(volume.images.shape)}")
    img = nib.Nifti1Image(volume.to_hu(images), volume.affine)
    sform, qform = volume.nifti_codes  # the input's codes: a viewer places the output where it placed the input
    img.set_sform(volume.affine, code=sform)
    img.set_qform(volume.affine, code=qform)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = f"ldir-pl reconstruction of {volume.name}"[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


class NiftiDataModule(SliceDataModule):
    """Every slice of every volume, HU -> [0, 1] by the reference transform, area-resized to ``image_size``.
    Image ids are ``<volume>/<slice index>``. ``val_volumes`` / ``test_volumes`` name volumes held out by
    name (never trained on); ``val_fraction`` / ``test_fraction`` split the remaining volumes. ``slices``
    keeps a slab of every volume: ``"START:STOP"`` or N (the centred N slices)."""

    def __init__(self, root: str, val_fraction: float = 0.2, test_fraction: float = 0.0,
                 val_volumes: Sequence[str] = (), test_volumes: Sequence[str] = (), slices: str | int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.val_volumes, self.test_volumes = [str(v) for v in val_volumes], [str(v) for v in test_volumes]
        self.slices = slices
        both = set(self.val_volumes) & set(self.test_volumes)
        if both:
            raise ConfigError(f"data.val_volumes and data.test_volumes share {sorted(both)}")
        self._volumes: dict[str, Volume] | None = None  # as read, until cut to the slab and resized
        self._cut: set[str] = set()
        self._split: dict[str, set[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._volumes is not None:
            return
        root = require_dir(self.root, "data.root (NIfTI folder)")
        volumes = {}
        for path in list_volumes(root):
            vol = read_nifti(path)
            name = str(path.relative_to(root).parent / vol.name)
            volumes[name] = replace(vol, name=name)
        self._volumes = volumes
        named = {**{v: "val" for v in self.val_volumes}, **{v: "test" for v in self.test_volumes}}
        missing = sorted(set(named) - set(volumes))
        if missing:
            raise DataError(f"NIfTI folder {root}: held-out volume(s) {missing} not found (volumes: {sorted(volumes)})")
        self._split = split_by_group([v for v in volumes if v not in named], self.val_fraction, self.test_fraction,
                                     self.seed)
        for vol, split in named.items():
            self._split[split].add(vol)
            self._split["all"].add(vol)
        log.info("NIfTI %s: %d slices of %d volumes; split train/val/test volumes %d/%d/%d", root,
                 sum(v.images.shape[0] for v in volumes.values()), len(volumes), len(self._split["train"]),
                 len(self._split["val"]), len(self._split["test"]))

    def groups(self, split: str) -> set[str]:
        self.setup()
        return set(self._split[split])

    def group_of(self, image_id: str) -> str:
        return image_id.rsplit("/", 1)[0]  # ids are <volume>/<slice index>

    def volumes(self, split: str) -> list[Volume]:
        """The split's volumes, cut to ``slices`` and resized; only the volumes used are cut, so a slab longer
        than a volume of another split is no error."""
        self.setup()
        for name in self._split[split] - self._cut:
            self._volumes[name] = self._volumes[name].slab(self.slices).resized(self.image_size)
            self._cut.add(name)
        return [v for name, v in self._volumes.items() if name in self._split[split]]

    def _items(self, split: str) -> list[Item]:
        return [(i, StoredImage(img)) for v in self.volumes(split) for i, img in zip(v.slice_ids, v.images)]
