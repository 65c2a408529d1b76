"""Random ellipse phantoms (ODL), a deterministic function of (seed, split, index): no files needed."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from ldir_pl.data.base import Item, SliceDataModule


def random_ellipses(rng: np.random.Generator, n_inner: tuple[int, int] = (4, 12)) -> list[list[float]]:
    """A body-like outer ellipse with soft-tissue contrast plus random inner structures."""
    body = [0.25 + 0.1 * rng.random(), 0.7 + 0.2 * rng.random(), 0.55 + 0.25 * rng.random(),
            0.05 * rng.standard_normal(), 0.05 * rng.standard_normal(), rng.uniform(0, np.pi)]
    ellipses = [body]
    for _ in range(rng.integers(n_inner[0], n_inner[1] + 1)):
        r = 0.5 * np.sqrt(rng.random())
        phi = rng.uniform(0, 2 * np.pi)
        ellipses.append([
            rng.uniform(-0.15, 0.35),
            rng.uniform(0.03, 0.3), rng.uniform(0.03, 0.3),
            r * np.cos(phi), r * np.sin(phi),
            rng.uniform(0, np.pi),
        ])
    return ellipses


def ellipse_phantom(size: int, seed: int) -> Tensor:
    """A (1, size, size) phantom in [0, 1]."""
    rng = np.random.default_rng(seed)
    import odl  # here, not at import: training on CT files runs where odl / astra are not installed

    space = odl.uniform_discr([-1, -1], [1, 1], (size, size), dtype="float32")
    img = odl.phantom.ellipsoid_phantom(space, random_ellipses(rng)).data
    return torch.from_numpy(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)).unsqueeze(0)


class PhantomImage:
    """Picklable lazy loader of one phantom."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __call__(self) -> Tensor:
        return ellipse_phantom(self.size, self.seed)


class PhantomDataModule(SliceDataModule):
    """Seeded random ellipse phantoms; sizes of the splits from config."""

    def __init__(self, num_train: int = 512, num_val: int = 32, num_test: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}

    def _split_seed(self, split: str, i: int) -> int:
        digest = hashlib.sha256(f"phantom:{self.seed}:{split}:{i}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def _items(self, split: str) -> list[Item]:
        splits = ("train", "val", "test") if split == "all" else (split,)
        return [(f"phantom_{s}_{i:05d}", PhantomImage(self.image_size, self._split_seed(s, i)))
                for s in splits for i in range(self.counts[s])]
