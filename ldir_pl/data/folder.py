"""A folder of 2-D slices stored as .npy, .png or .tif files."""

from __future__ import annotations

from pathlib import Path

import torch

from ldir_pl.data.base import Item, SliceDataModule, StoredImage, split_by_group
from ldir_pl.data.readers import (
    IMAGE_SUFFIXES,
    DataError,
    check_same_shape,
    list_files,
    read_image_file,
    require_dir,
)
from ldir_pl.data.transforms import hu_to_unit, resize_area
from ldir_pl.errors import ConfigError

INTENSITIES = ("unit", "hu")


class FolderDataModule(SliceDataModule):
    """``intensity='unit'``: values already in [0, 1] (PNG/TIFF integers are scaled by their type's maximum);
    ``'hu'``: values in Hounsfield units, mapped by the reference transform. Files are split (not patients:
    folders carry no patient information) deterministically from the seed."""

    def __init__(self, root: str, intensity: str = "unit", val_fraction: float = 0.1,
                 test_fraction: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if intensity not in INTENSITIES:
            raise ConfigError(f"data.intensity={intensity!r}: expected one of {INTENSITIES}")
        self.root, self.intensity = root, intensity
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self._images: dict[str, torch.Tensor] | None = None
        self._split: dict[str, set[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._images is not None:
            return
        root = require_dir(self.root, "data.root (image folder)")
        files = list_files(root, IMAGE_SUFFIXES, f"image folder {root}")
        arrays = {p: read_image_file(p) for p in files}
        check_same_shape({p: a.shape for p, a in arrays.items()}, f"image folder {root}")
        self._images = {}
        for p, a in arrays.items():
            x = torch.from_numpy(a)
            x = hu_to_unit(x) if self.intensity == "hu" else x
            if self.intensity == "unit" and (x.min() < -0.05 or x.max() > 1.05):
                raise DataError(f"{p}: values span [{float(x.min()):.3g}, {float(x.max()):.3g}], not [0, 1]; "
                                "set data.intensity=hu for HU images or rescale them")
            self._images[str(Path(p).relative_to(root).with_suffix(""))] = resize_area(
                x.clamp(0, 1).unsqueeze(0), self.image_size)
        self._split = split_by_group(list(self._images), self.val_fraction, self.test_fraction, self.seed) \
            if len(self._images) > 1 else {s: set(self._images) for s in ("train", "val", "test", "all")}

    def _items(self, split: str) -> list[Item]:
        self.setup()
        return [(i, StoredImage(t)) for i, t in self._images.items() if i in self._split[split]]
