"""``LDIRModule``: reconstruction methods run as a LightningModule ``predict_step``.

Lightning's predict loop gives device placement, DDP sharding of a test set, progress bars and
prediction writers; every method (FBP, TV, LDIR, DPS...) sees the same batch, and each is timed and
metered on its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from ldir_pl.apps.memory import PeakMemory
from ldir_pl.errors import ConfigError
from ldir_pl.metrics import image_metrics, volume_metrics
from ldir_pl.physics import LinearPhysics, VolumePhysics
from ldir_pl.sampling.base import Reconstructor


class LDIRModule(pl.LightningModule):
    """Runs ``reconstructors`` (name -> method) on each predict batch; returns images and metrics."""

    def __init__(self, reconstructors: Mapping[str, Reconstructor], physics: LinearPhysics) -> None:
        super().__init__()
        if not reconstructors:
            raise ConfigError("LDIRModule needs at least one reconstruction method")
        self.reconstructors = dict(reconstructors)
        # Register nn.Module methods (e.g. with a diffusion prior) so Lightning moves them to the device.
        self.methods = nn.ModuleDict({k: v for k, v in self.reconstructors.items() if isinstance(v, nn.Module)})
        self.physics = physics

    def on_predict_start(self) -> None:
        """Methods that are not ``nn.Module``s (samplers holding a prior) go to this rank's device now,
        after Lightning has placed the module: each DDP rank uses its own GPU."""
        for method in self.reconstructors.values():
            if not isinstance(method, nn.Module) and hasattr(method, "to"):
                method.to(self.device)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """A volume's description (geometry, affine) stays as it is; its tensors move."""
        volume = batch.pop("volume", None) if isinstance(batch, dict) else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if volume is not None:
            batch["volume"] = volume
        return batch

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """One batch of slices, or one volume (``batch["volume"]``: its slices in z order, measured slice by slice,
        reconstructed with a ``VolumePhysics`` so 3-D methods can couple them)."""
        ids = [str(i) for i in batch["id"]]
        y = batch["y"].to(self.device, torch.float32)
        volume = batch.get("volume")
        physics = self.physics if volume is None else VolumePhysics(self.physics, volume.z_ratio)
        physics.check(y, source=f"predict batch {batch_idx} (first image {ids[0]})")
        x = batch.get("x")
        out = {"id": ids if volume is None else [volume.name], "x": None if x is None else x.cpu(), "recon": {},
               "seconds": {}, "peak_mem_mb": {}, "metrics": {}, "volume": volume}
        for name, method in self.reconstructors.items():
            # guided samplers turn autograd on themselves (the Trainer runs predict without inference mode)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            with PeakMemory(self.device) as mem:
                recon = method.reconstruct(y.clone(), physics, ids)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            recon = recon.detach().float().clamp(0, 1).cpu()
            if not torch.isfinite(recon).all():
                raise FloatingPointError(f"{name} produced NaN/inf for images {ids}")
            out["recon"][name] = recon
            out["seconds"][name] = seconds / len(ids)  # per slice
            out["peak_mem_mb"][name] = mem.peak_mb
            if x is not None:
                truth = x.cpu().float()
                metrics = image_metrics(recon, truth) if volume is None else volume_metrics(recon, truth)
                out["metrics"][name] = {k: v.tolist() for k, v in metrics.items()}
        return out
