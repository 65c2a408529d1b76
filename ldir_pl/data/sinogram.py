"""Measured sinograms with no ground truth: ``.npy`` files ((V,D) or (N,V,D)) or HDF5 datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ldir_pl.data.base import SliceDataModule
from ldir_pl.data.lodopab import open_dataset
from ldir_pl.data.readers import DataError, list_files


class SinogramDataset(Dataset):
    def __init__(self, entries: list[tuple[str, torch.Tensor]]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        image_id, y = self.entries[i]
        return {"y": y, "id": image_id}


class SinogramDataModule(SliceDataModule):
    """Reconstruction only. Every sinogram is checked against the physics' geometry before any work."""

    def __init__(self, root: str, key: str = "data", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.key = root, key

    def _read(self) -> list[tuple[str, torch.Tensor]]:
        root = Path(self.root).expanduser()
        if not root.exists():
            raise DataError(f"data.root: {root} does not exist")
        files = [root] if root.is_file() else list_files(root, {".npy", ".h5", ".hdf5"}, f"sinogram folder {root}")
        out = []
        for p in files:
            if p.suffix == ".npy":
                try:
                    arr = np.load(p, allow_pickle=False)
                except Exception as err:
                    raise DataError(f"{p}: cannot read .npy ({err})") from err
            else:
                ds = open_dataset(p, self.key)
                arr = ds[()]
                ds.file.close()
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3:
                raise DataError(f"{p}: sinogram array of shape {arr.shape}; expected (V, D) or (N, V, D)")
            for i, sino in enumerate(arr):
                image_id = p.stem if len(arr) == 1 else f"{p.stem}_{i:04d}"
                y = torch.from_numpy(sino).unsqueeze(0)
                self.physics.check(y, source=f"{p}" + ("" if len(arr) == 1 else f"[{i}]"))
                out.append((image_id, y))
        return out

    def predict_dataloader(self) -> DataLoader:
        if self.physics is None:
            raise RuntimeError("predict_dataloader needs the physics: call attach_physics(physics) first")
        entries = self._read()
        if self.max_images is not None:
            entries = entries[: self.max_images]
        return DataLoader(SinogramDataset(entries), batch_size=self.predict_batch_size, shuffle=False)

    def train_dataloader(self):
        raise RuntimeError("data=sinogram holds measurements only; train priors on an image source")

    val_dataloader = test_dataloader = train_dataloader
