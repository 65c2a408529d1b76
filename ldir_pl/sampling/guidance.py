"""The guidance step of a guided sampler: the data misfit of the decoded clean estimate, its gradient, and the
history-gradient update that applies it (LDIR: Adam over past gradients; DPS: plain steps)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics import LinearPhysics
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.history import HistoryUpdater, StepSize

WRT = ("zt", "z0")


class Guidance:
    """``fidelity(y, A D(z0))`` differentiated w.r.t. ``z_t`` (through UNet and decoder, as the LDIR authors)
    or w.r.t. ``z0`` itself (decoder only: no UNet backward), applied by ``update`` with ``step_size``;
    ``every``: guide every k-th sampling step only (counted back from the last, which is always guided).
    ``final_steps`` more updates at t = 0 with step ``final_lr`` continue the same history (decoder only)."""

    def __init__(self, fidelity: DataFidelity, update: HistoryUpdater, step_size: StepSize, wrt: str,
                 every: int, final_steps: int, final_lr: float | None) -> None:
        if wrt not in WRT:
            raise ConfigError(f"sampler.guidance.wrt={wrt!r}: expected one of {WRT}")
        if int(every) < 1 or int(final_steps) < 0:
            raise ConfigError(f"sampler.guidance: every={every} must be >= 1 and final_steps={final_steps} >= 0")
        if int(final_steps) > 0 and final_lr is None:
            raise ConfigError(f"sampler.guidance.final_steps={final_steps} needs a final_lr")
        self.fidelity, self.update, self.step_size = fidelity, update, step_size
        self.wrt, self.every = wrt, int(every)
        self.final_steps, self.final_lr = int(final_steps), None if final_lr is None else float(final_lr)

    def lr(self, i: int, n: int, alpha_bar: float) -> float:
        """Step size at sampling step ``i`` of ``n`` (0 where this step is not guided)."""
        return self.step_size(i, n, alpha_bar=alpha_bar) if (n - 1 - i) % self.every == 0 else 0.0

    def gradient(self, y: Tensor, physics: LinearPhysics, decode: Callable[[Tensor], Tensor], z0: Tensor,
                 wrt: Tensor) -> tuple[Tensor, Tensor]:
        """(d misfit / d ``wrt``, per-image misfit) for the clean estimate ``z0`` (a function of ``wrt``)."""
        x = decode(z0).float()
        with torch.autocast(x.device.type, enabled=False):  # the data term stays fp32 under a bf16 sampler
            loss = self.fidelity(y, physics.A(x))
        (g,) = torch.autograd.grad(loss.sum(), wrt)
        return g.detach(), loss.detach()


__all__ = ["Guidance", "WRT"]
