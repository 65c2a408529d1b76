"""A training set packed into one compact file, for a machine that has the project but not the data (a GPU node
without network access): every slice as int16 HU with its id and patient / volume, per split.

``experiments/pack_gpu_run.py`` writes it from any slice data config (``data=ct_mix`` by default); ``data=packed
data.path=FILE`` trains from it exactly as from the sources it was packed from (the same images to 1 HU, the same
splits, the same ids).
"""

from __future__ import annotations

import lzma
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ldir_pl.atomic import atomic_path
from ldir_pl.data.base import SPLITS, Item, SliceDataModule, StoredImage
from ldir_pl.data.readers import DataError
from ldir_pl.data.transforms import HU_OFFSET, HU_SCALE, hu_to_unit, resize_area
from ldir_pl.errors import MissingPathError

PACKED_SPLITS = ("train", "val", "test")


def pack(path: str | Path, source: SliceDataModule, splits: Sequence[str] = ("train", "val")) -> dict[str, int]:
    """Write ``source``'s ``splits`` (images, ids, patients / volumes) as int16 HU into one compressed ``.npz``;
    returns the slice count per split."""
    arrays: dict[str, np.ndarray] = {}
    counts = {}
    for split in splits:
        items = source.items(split)
        ids = [i for i, _ in items]
        hu = np.stack([np.rint(load()[0].numpy() * HU_SCALE - HU_OFFSET) for _, load in items]).astype(np.int16)
        groups = [source.group_of(i) for i in ids]
        arrays[f"{split}_hu"], arrays[f"{split}_shape"] = compress_hu(hu), np.asarray(hu.shape)
        arrays[f"{split}_ids"] = np.asarray(ids, dtype=str)
        arrays[f"{split}_groups"] = np.asarray(groups, dtype=str)
        counts[split] = len(ids)
    with atomic_path(Path(path)) as tmp:
        np.savez(tmp, **arrays)
    return counts


def compress_hu(hu: np.ndarray) -> np.ndarray:
    """int16 HU -> LZMA bytes of its byte planes (high bytes, then low bytes): CT's high bytes are nearly constant,
    so this is about a third of the raw size, against half for zip of the plain array."""
    planes = hu.astype("<i2").view(np.uint8).reshape(-1, 2).T.copy()
    return np.frombuffer(lzma.compress(planes.tobytes(), preset=6), dtype=np.uint8)


def decompress_hu(blob: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    planes = np.frombuffer(lzma.decompress(blob.tobytes()), dtype=np.uint8).reshape(2, -1)
    return planes.T.copy().view("<i2").reshape(tuple(int(v) for v in shape))


class PackedDataModule(SliceDataModule):
    """The slices of a file written by ``pack``; splits and ids are the packed ones (``val`` / ``test`` missing
    from the file are empty)."""

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self._data: dict[str, tuple[list[str], list[str], np.ndarray]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise MissingPathError(f"data.path={path}: no packed data file (write one with experiments/pack_gpu_run.py)")
        try:
            with np.load(path, allow_pickle=False) as f:
                self._data = {s: (f[f"{s}_ids"].tolist(), f[f"{s}_groups"].tolist(),
                                  decompress_hu(f[f"{s}_hu"], f[f"{s}_shape"]))
                              for s in PACKED_SPLITS if f"{s}_hu" in f}
        except (OSError, ValueError, KeyError, lzma.LZMAError) as err:
            raise DataError(f"{path}: not a packed data file ({type(err).__name__}: {err})") from err
        if "train" not in self._data:
            raise DataError(f"{path}: holds no training split")
        self._groups = {i: g for ids, groups, _ in self._data.values() for i, g in zip(ids, groups)}

    def group_of(self, image_id: str) -> str:
        self.setup()
        return self._groups[image_id]

    def _items(self, split: str) -> list[Item]:
        self.setup()
        if split not in SPLITS:
            raise DataError(f"split {split!r} not in {SPLITS}")
        parts = list(self._data.values()) if split == "all" else [self._data[split]] if split in self._data else []
        out = []
        for ids, _, hu in parts:
            for i, h in zip(ids, hu):
                x = hu_to_unit(torch.from_numpy(h.astype(np.float32))).unsqueeze(0)
                out.append((i, StoredImage(resize_area(x, self.image_size))))
        return out


__all__ = ["PackedDataModule", "pack"]
