"""LoDoPaB-CT HDF5 files: ``ground_truth_{train,validation,test}_NNN.hdf5`` (dataset ``data``, 362x362 slices in
[0, 1]) and the matching ``observation_*`` files (1000x513 post-log sinograms).

Files are indexed at setup (shape checks only) and read lazily, slice by slice: the full set is ~35k slices.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ldir_pl.data.base import Item, SliceDataModule
from ldir_pl.data.readers import DataError, require_dir
from ldir_pl.data.transforms import resize_area

SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
LODOPAB_SIZE = 362


def open_dataset(path: Path, key: str = "data") -> h5py.Dataset:
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from err
    if key not in f:
        keys = list(f.keys())
        f.close()
        raise DataError(f"{path}: HDF5 file has no dataset {key!r} (found {keys})")
    return f[key]


class H5Slice:
    """Picklable lazy reader of one slice; each process opens its own file handle."""

    _handles: dict[str, h5py.Dataset] = {}

    def __init__(self, path: Path, index: int, size: int) -> None:
        self.path, self.index, self.size = str(path), int(index), int(size)

    def read(self) -> Tensor:
        ds = H5Slice._handles.get(self.path)
        if ds is None:
            ds = H5Slice._handles[self.path] = open_dataset(Path(self.path))
        return torch.from_numpy(ds[self.index].astype("float32"))

    def __call__(self) -> Tensor:
        return resize_area(self.read().clamp(0, 1).unsqueeze(0), self.size)


def _index(root: Path, prefix: str, split: str) -> list[tuple[Path, int]]:
    files = sorted(root.glob(f"{prefix}_{SPLIT_NAMES[split]}_*.hdf5"))
    out = []
    for p in files:
        ds = open_dataset(p)
        if ds.ndim != 3:
            raise DataError(f"{p}: dataset 'data' has shape {ds.shape}, expected (N, H, W)")
        n = ds.shape[0]
        ds.file.close()
        out += [(p, i) for i in range(n)]
    return out


class ObservationDataset(Dataset):
    """Ground truth plus LoDoPaB's own measured sinogram (no simulation)."""

    def __init__(self, gt: list[tuple[Path, int]], obs: list[tuple[Path, int]], size: int, physics) -> None:
        self.gt, self.obs, self.size, self.physics = gt, obs, size, physics

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, i: int) -> dict:
        (gp, gi), (op, oi) = self.gt[i], self.obs[i]
        y = H5Slice(op, oi, 0).read().unsqueeze(0)
        self.physics.check(y, source=f"{op}[{oi}]")
        return {"x": H5Slice(gp, gi, self.size)(), "y": y, "id": f"{gp.stem}_{gi:04d}"}


class LoDoPaBDataModule(SliceDataModule):
    """``use_observations=True`` reconstructs from the dataset's measured sinograms; the physics must then
    match LoDoPaB's geometry (1000 views, 513 bins, image_size 362), which is checked per slice."""

    def __init__(self, root: str, use_observations: bool = False, predict_split: str = "test", **kwargs) -> None:
        super().__init__(predict_split=predict_split, **kwargs)
        self.root, self.use_observations = root, bool(use_observations)
        self._gt: dict[str, list[tuple[Path, int]]] = {}

    def _entries(self, split: str) -> list[tuple[Path, int]]:
        if split == "all":
            return [e for s in SPLIT_NAMES for e in self._entries(s)]
        if split not in self._gt:
            root = require_dir(self.root, "data.root (LoDoPaB-CT folder)")
            self._gt[split] = _index(root, "ground_truth", split)
            if not self._gt[split]:
                raise DataError(f"LoDoPaB-CT folder {root}: no ground_truth_{SPLIT_NAMES[split]}_*.hdf5 files")
        return self._gt[split]

    def _items(self, split: str) -> list[Item]:
        return [(f"{p.stem}_{i:04d}", H5Slice(p, i, self.image_size)) for p, i in self._entries(split)]

    def predict_dataloader(self) -> DataLoader:
        if not self.use_observations:
            return super().predict_dataloader()
        if self.physics is None:
            raise RuntimeError("predict_dataloader needs the physics: call attach_physics(physics) first")
        gt = self._entries(self.predict_split)
        root = Path(self.root)
        obs = _index(root, "observation", self.predict_split)
        if len(obs) != len(gt):
            raise DataError(f"LoDoPaB-CT folder {root}: {len(gt)} ground-truth slices but {len(obs)} observations "
                            f"for split {self.predict_split}")
        if self.max_images is not None:
            gt, obs = gt[: self.max_images], obs[: self.max_images]
        return DataLoader(ObservationDataset(gt, obs, self.image_size, self.physics),
                          batch_size=self.predict_batch_size, shuffle=False)
