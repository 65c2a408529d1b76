"""Writes each predict batch as it is produced (per rank), so long runs lose nothing and DDP shards merge.

Every file is written under a temporary name and renamed when whole (``ldir_pl.atomic``); the per-rank rows in
``parts/`` are appended one line per image, so an interrupted run still reports the images it finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from ldir_pl.apps.report import rows_from_prediction, save_panel, save_volume_panel
from ldir_pl.atomic import atomic_path
from ldir_pl.data.dicom_out import describe, slice_affine, write_dicom_series
from ldir_pl.data.nifti import write_nifti
from ldir_pl.data.transforms import HU_OFFSET, HU_SCALE


class ReconstructionWriter(BasePredictionWriter):
    """Rows to ``parts/rank{r}.jsonl``, PNG panels of the first ``num_panels`` images in the CT ``window``,
    optional ``.npy`` images; for volumes, ``volumes/<method>/<volume>.nii.gz`` (HU, the input's affine and
    NIfTI codes) and orthogonal-view panels. With ``dicom``, every reconstruction is also a DICOM series in
    ``dicom/<method>/<volume or image id>/``: ``source_file(image_id)`` gives a slice's input DICOM file
    (its patient, study and geometry), and ``label`` the measurement for the SeriesDescription."""

    def __init__(self, output_dir: str | Path, num_panels: int = 8, save_reconstructions: bool = True,
                 window: str = "soft_tissue", dicom: bool = False,
                 source_file: Callable[[str], Path | None] | None = None, label: str = "") -> None:
        super().__init__(write_interval="batch")
        self.out = Path(output_dir)
        self.num_panels, self.save_reconstructions = int(num_panels), bool(save_reconstructions)
        self.window, self.dicom, self.source_file, self.label = window, bool(dicom), source_file, label
        self._panels = 0

    def part_path(self, rank: int) -> Path:
        return self.out / "parts" / f"rank{rank}.jsonl"

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self.part_path(trainer.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self._panels = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if prediction.get("volume") is not None:
            self._write_volume(trainer, prediction)
        else:
            self._write_slices(trainer, prediction)
        with open(self.part_path(trainer.global_rank), "a") as f:  # rows last: a listed image has its files
            for row in rows_from_prediction(prediction):
                f.write(json.dumps(row) + "\n")

    def _write_slices(self, trainer, prediction: dict) -> None:
        for i, image_id in enumerate(prediction["id"]):
            recons = {k: v[i, 0].numpy() for k, v in prediction["recon"].items()}
            if self.save_reconstructions:
                for method, img in recons.items():
                    with atomic_path(self.out / "reconstructions" / method / f"{image_id}.npy") as tmp:
                        np.save(tmp, img.astype(np.float32))
            if self.dicom:
                source = self.source_file(image_id) if self.source_file is not None else None
                size = recons[next(iter(recons))].shape[-1]
                for method, img in recons.items():
                    hu = img[None].astype(np.float64) * HU_SCALE - HU_OFFSET
                    write_dicom_series(self.out / "dicom" / method / image_id, hu, slice_affine(source, size),
                                       describe(method, self.label), template=source)
            if trainer.global_rank == 0 and self._panels < self.num_panels:
                truth = None if prediction["x"] is None else prediction["x"][i, 0].numpy()
                metrics = {k: (m["psnr"][i], m["ssim"][i]) for k, m in prediction["metrics"].items()}
                save_panel(self.out / "panels" / f"{image_id.replace('/', '_')}.png", image_id, truth, recons, metrics,
                           window=self.window)
                self._panels += 1

    def _write_volume(self, trainer, prediction: dict) -> None:
        vol = prediction["volume"]
        for method, images in prediction["recon"].items():
            if self.save_reconstructions:
                write_nifti(self.out / "volumes" / method / f"{vol.name}.nii.gz", vol, images)
            if self.dicom:
                hu = np.moveaxis(vol.to_hu(images), -1, 0)
                write_dicom_series(self.out / "dicom" / method / vol.name, hu, vol.affine, describe(method, self.label),
                                   template=vol.files[0] if vol.files else None)
        if trainer.global_rank == 0 and self._panels < self.num_panels:
            truth = None if prediction["x"] is None else prediction["x"][:, 0].numpy()
            recons = {k: v[:, 0].numpy() for k, v in prediction["recon"].items()}
            metrics = {k: {m: v[0] for m, v in ms.items()} for k, ms in prediction["metrics"].items()}
            save_volume_panel(self.out / "panels" / f"{vol.name.replace('/', '_')}.png", vol.name, truth, recons,
                              vol.spacing, metrics, window=self.window)
            self._panels += 1
