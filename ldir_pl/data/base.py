"""Shared machinery of the data modules: images for training, (image, measurement) pairs for reconstruction.

A source family only says how to list its slices (``_items``: split -> list of (id, loader)); this base turns
them into training batches of (B,1,H,W) tensors in [0, 1] and into predict batches of dicts
``{"x": (B,1,H,W), "y": (B,1,V,D), "id": [...]}`` whose measurements come from the attached physics,
with noise seeded by image id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ldir_pl.data.transforms import Augment
from ldir_pl.errors import ConfigError

log = logging.getLogger(__name__)

Item = tuple[str, Callable[[], Tensor]]  # (image id, loader returning a (1,H,W) tensor in [0,1])
SPLITS = ("train", "val", "test", "all")


class StoredImage:
    """A picklable loader for an image already in memory (data-loader workers, DDP)."""

    def __init__(self, image: Tensor) -> None:
        self.image = image

    def __call__(self) -> Tensor:
        return self.image.clone()


class ImageDataset(Dataset):
    """Images only, optionally augmented (training and validation of the priors)."""

    def __init__(self, items: Sequence[Item], augment: Augment | None = None) -> None:
        self.items, self.augment = list(items), augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        x = self.items[i][1]()
        if self.augment is not None:
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            x = self.augment(x, gen)
        return x


class MeasurementDataset(Dataset):
    """(ground truth, simulated measurement, id) for reconstruction; noise depends only on the id."""

    def __init__(self, items: Sequence[Item], physics) -> None:
        self.items, self.physics = list(items), physics

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image_id, load = self.items[i]
        x = load()
        y = self.physics.measure(x.unsqueeze(0), [image_id])[0]
        return {"x": x, "y": y, "id": image_id}


class VolumeDataset(Dataset):
    """One item per volume: its slices, their measurements (each slice seeded by its own id), and geometry."""

    def __init__(self, volumes: Sequence, physics) -> None:
        self.volumes, self.physics = list(volumes), physics

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict:
        vol = self.volumes[i]
        return {"x": vol.images, "y": self.physics.measure(vol.images, vol.slice_ids), "id": vol.slice_ids,
                "volume": vol}


#: the seed of every patient / volume split: the same held-out patients for training, tuning and reporting
SPLIT_SEED = 1234


class SliceDataModule(pl.LightningDataModule):
    """Base data module; subclasses implement ``_items(split)``. ``image_size``, ``batch_size``, ``num_workers``,
    ``augment`` and ``predict_split`` are per-source settings of each ``conf/data`` file."""

    def __init__(
        self,
        image_size: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = SPLIT_SEED,
        augment: bool = False,
        predict_split: str = "all",
        max_images: int | None = None,
        predict_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if predict_split not in SPLITS:
            raise ConfigError(f"data.predict_split={predict_split!r}: expected one of {SPLITS}")
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.seed, self.augment, self.predict_split = int(seed), bool(augment), predict_split
        if max_images is not None and (isinstance(max_images, bool) or not str(max_images).lstrip("-").isdigit()
                                       or int(max_images) < 1):
            raise ConfigError(f"data.max_images={max_images!r}: expected a count >= 1 (null: every image)")
        self.max_images = None if max_images is None else int(max_images)
        self.predict_batch_size = int(predict_batch_size or batch_size)
        self.physics = None

    # ------------------------------------------------------------------ subclass API
    def _items(self, split: str) -> list[Item]:
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    def attach_physics(self, physics) -> None:
        """Reconstruction needs the measurement model built from the same config."""
        if tuple(physics.image_shape) != (self.image_size, self.image_size):
            raise ConfigError(f"physics reconstructs {physics.image_shape[0]}x{physics.image_shape[1]} images but "
                             f"data.image_size={self.image_size}: set both to the same size (physics=lodopab "
                             "is 362)")
        self.physics = physics

    def group_of(self, image_id: str) -> str:
        """The patient (volume) an image belongs to; here every image is its own group, sources that know patients
        or volumes say so."""
        return image_id

    def groups(self, split: str) -> set[str]:
        """The patients (volumes) a split holds: what must never cross from training into evaluation."""
        return {self.group_of(i) for i, _ in self.items(split)}

    def items(self, split: str) -> list[Item]:
        items = self._items(split)
        if self.max_images is not None:
            items = items[: int(self.max_images)]
        return items

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=False)

    def train_dataloader(self) -> DataLoader:
        aug = Augment() if self.augment else None
        return self._loader(ImageDataset(self.items("train"), aug), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ImageDataset(self.items("val")), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(ImageDataset(self.items("test")), shuffle=False)

    def volumes(self, split: str) -> list:
        """The split's volumes (``ldir_pl.data.volumes.Volume``), for sources that hold volumes."""
        raise ConfigError(f"{type(self).__name__} holds single slices, not volumes: use data=nifti or data=dicom "
                          "(a folder of DICOM series) with recon.volume=true")

    def volume_dataloader(self) -> DataLoader:
        """One volume per batch (``predict_split``), measured slice by slice with the attached physics."""
        if self.physics is None:
            raise RuntimeError("volume_dataloader needs measurements: call attach_physics(physics) first")
        volumes = self.volumes(self.predict_split)
        if self.max_images is not None:
            volumes = volumes[: int(self.max_images)]
        return DataLoader(VolumeDataset(volumes, self.physics), batch_size=None, shuffle=False, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        if self.physics is None:
            raise RuntimeError("predict_dataloader needs measurements: call attach_physics(physics) first")
        return DataLoader(MeasurementDataset(self.items(self.predict_split), self.physics),
                          batch_size=self.predict_batch_size, shuffle=False, num_workers=0)


def split_record(datamodule: SliceDataModule) -> dict[str, object]:
    """Which patients / volumes a data module trains on and which it holds out, as a prior bundle records them so
    that anyone can check an evaluation set against what trained it."""
    record: dict[str, object] = {split: sorted(datamodule.groups(split)) for split in ("train", "val", "test")}
    record["train_images"] = len(datamodule.items("train"))
    return record


def split_by_group(groups: Sequence[str], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, set[str]]:
    """Assign whole groups (patients) to train/val/test, deterministically from the seed."""
    unique = sorted(set(groups))
    if not 0 <= val_fraction + test_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} + data.test_fraction={test_fraction} must be in [0,1)")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [unique[i] for i in order]
    n_val = round(len(unique) * val_fraction)
    n_test = round(len(unique) * test_fraction)
    if val_fraction > 0 and n_val == 0 and len(unique) > 1:
        n_val = 1
    val = set(shuffled[:n_val])
    test = set(shuffled[n_val:n_val + n_test])
    train = set(shuffled[n_val + n_test:])
    if not train:
        raise ConfigError(f"only {len(unique)} patient(s)/group(s): nothing left for training after the split")
    return {"train": train, "val": val, "test": test, "all": set(unique)}
