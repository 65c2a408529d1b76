"""Writes each predict batch as it is produced (per rank), so long runs lose nothing and DDP shards merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from ldir_pl.apps.report import rows_from_prediction, save_panel, save_volume_panel
from ldir_pl.data.volumes import write_nifti


class ReconstructionWriter(BasePredictionWriter):
    """Rows to ``parts/rank{r}.jsonl``, PNG panels of the first ``num_panels`` images, optional ``.npy`` images;
    for volumes, ``volumes/<method>/<volume>.nii.gz`` (HU, the input's affine) and orthogonal-view panels."""

    def __init__(self, output_dir: str | Path, num_panels: int = 8, save_reconstructions: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(output_dir)
        self.num_panels, self.save_reconstructions = int(num_panels), bool(save_reconstructions)
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
        with open(self.part_path(trainer.global_rank), "a") as f:
            for row in rows_from_prediction(prediction):
                f.write(json.dumps(row) + "\n")
        if prediction.get("volume") is not None:
            self._write_volume(trainer, prediction)
            return
        for i, image_id in enumerate(prediction["id"]):
            recons = {k: v[i, 0].numpy() for k, v in prediction["recon"].items()}
            if self.save_reconstructions:
                for method, img in recons.items():
                    path = self.out / "reconstructions" / method / f"{image_id}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, img.astype(np.float32))
            if trainer.global_rank == 0 and self._panels < self.num_panels:
                truth = None if prediction["x"] is None else prediction["x"][i, 0].numpy()
                metrics = {k: (m["psnr"][i], m["ssim"][i]) for k, m in prediction["metrics"].items()}
                save_panel(self.out / "panels" / f"{image_id.replace('/', '_')}.png", image_id, truth, recons, metrics)
                self._panels += 1

    def _write_volume(self, trainer, prediction: dict) -> None:
        vol = prediction["volume"]
        if self.save_reconstructions:
            for method, images in prediction["recon"].items():
                write_nifti(self.out / "volumes" / method / f"{vol.name}.nii.gz", vol, images)
        if trainer.global_rank == 0 and self._panels < self.num_panels:
            truth = None if prediction["x"] is None else prediction["x"][:, 0].numpy()
            recons = {k: v[:, 0].numpy() for k, v in prediction["recon"].items()}
            metrics = {k: {m: v[0] for m, v in ms.items()} for k, ms in prediction["metrics"].items()}
            save_volume_panel(self.out / "panels" / f"{vol.name.replace('/', '_')}.png", vol.name, truth, recons,
                              vol.spacing, metrics)
            self._panels += 1
