"""A folder of axial CT slices in DICOM (AAPM/Mayo, TCIA...), split by PatientID."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ldir_pl.data.base import Item, SliceDataModule, StoredImage, split_by_group
from ldir_pl.data.readers import (
    CT_MODALITIES,
    DICOM_SUFFIXES,
    check_same_shape,
    list_files,
    read_dicom,
    require_dir,
)
from ldir_pl.data.transforms import hu_to_unit, resize_area
from ldir_pl.data.volumes import Volume, read_dicom_series

log = logging.getLogger(__name__)


class DicomDataModule(SliceDataModule):
    """Slices are read, converted HU -> [0,1] and resized once at setup: every file is validated before
    any training or reconstruction starts, and epochs do not re-decode DICOM."""

    def __init__(self, root: str, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 slices: str | int | None = None, modalities: Sequence[str] = CT_MODALITIES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.modalities = tuple(str(m) for m in modalities)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.slices = slices  # a slab of every series in volume mode: "START:STOP" or N (centred)
        self._images: dict[str, torch.Tensor] | None = None
        self._patients: dict[str, str] = {}
        self._files: dict[str, Path] = {}
        self._split: dict[str, set[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._images is not None:
            return
        root = require_dir(self.root, "data.root (DICOM folder)")
        files = list_files(root, DICOM_SUFFIXES, f"DICOM folder {root}")
        slices = [read_dicom(p, self.modalities) for p in files]
        check_same_shape({s.path: s.hu.shape for s in slices}, f"DICOM folder {root}")
        self._images, ids = {}, []
        for s in slices:
            image_id = str(s.path.relative_to(root).with_suffix(""))
            x = hu_to_unit(torch.from_numpy(s.hu)).unsqueeze(0)
            self._images[image_id] = resize_area(x, self.image_size)
            self._patients[image_id] = s.patient_id
            self._files[image_id] = s.path
            ids.append(image_id)
        self._split = split_by_group(list(self._patients.values()), self.val_fraction, self.test_fraction,
                                     self.seed)
        log.info("DICOM %s: %d slices of %d patients; split train/val/test patients %d/%d/%d", root,
                 len(ids), len(self._split["all"]), len(self._split["train"]), len(self._split["val"]),
                 len(self._split["test"]))

    def patient_of(self, image_id: str) -> str:
        self.setup()
        return self._patients[image_id]

    def patients(self, split: str) -> set[str]:
        self.setup()
        return self._split[split]

    groups = patients
    group_of = patient_of

    def source_file(self, image_id: str) -> Path:
        """The DICOM file a slice came from (DICOM out copies its patient, study and geometry)."""
        self.setup()
        return self._files[image_id]

    def volumes(self, split: str) -> list[Volume]:
        """The DICOM series of the split's patients as volumes (sorted along the slice normal, checked)."""
        keep = self.patients(split)
        series = read_dicom_series(require_dir(self.root, "data.root (DICOM folder)"), self.modalities)
        return [vol.slab(self.slices).resized(self.image_size) for patient, vol in series.values() if patient in keep]

    def _items(self, split: str) -> list[Item]:
        self.setup()
        keep = self._split[split]
        return [(i, StoredImage(t)) for i, t in self._images.items() if self._patients[i] in keep]
