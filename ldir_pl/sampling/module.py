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

from ldir_pl.memory import PeakMemory
from ldir_pl.metrics import image_metrics
from ldir_pl.physics import LinearPhysics
from ldir_pl.sampling.base import Reconstructor


class LDIRModule(pl.LightningModule):
    """Runs ``reconstructors`` (name -> method) on each predict batch; returns images and metrics."""

    def __init__(self, reconstructors: Mapping[str, Reconstructor], physics: LinearPhysics) -> None:
        super().__init__()
        if not reconstructors:
            raise ValueError("LDIRModule needs at least one reconstruction method")
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

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        ids = [str(i) for i in batch["id"]]
        y = batch["y"].to(self.device, torch.float32)
        self.physics.check(y, source=f"predict batch {batch_idx} (first image {ids[0]})")
        x = batch.get("x")
        out = {"id": ids, "x": None if x is None else x.cpu(), "recon": {}, "seconds": {}, "peak_mem_mb": {},
               "metrics": {}}
        for name, method in self.reconstructors.items():
            # Guided samplers need autograd: Lightning's predict runs under inference mode.
            with torch.inference_mode(False), torch.enable_grad():
                y_in = y.clone()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                with PeakMemory(self.device) as mem:
                    recon = method.reconstruct(y_in, self.physics, ids)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - t0
            recon = recon.detach().float().clamp(0, 1).cpu()
            if not torch.isfinite(recon).all():
                raise FloatingPointError(f"{name} produced NaN/inf for images {ids}")
            out["recon"][name] = recon
            out["seconds"][name] = seconds / len(ids)
            out["peak_mem_mb"][name] = mem.peak_mb
            if x is not None:
                out["metrics"][name] = {k: v.tolist() for k, v in image_metrics(recon, x.cpu().float()).items()}
        return out
