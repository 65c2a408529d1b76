"""Data consistency inside the sampling loop, coupled along z (the DDS / DiffusionMBIR form of 3-D diffusion
reconstruction): at a guided step the decoded clean estimates of a chunk of adjacent slices are moved onto
the data by a few ADMM iterations on

    min_x  ||A x - y||^2 + lam ||A||^2 ||x - x0||^2 + mu ||A||^2 z_ratio sum_k |x_{k+1} - x_k|,

the proximal term keeping them near the prior's estimate and the z-TV term joining neighbouring slices that a
2-D prior sees one at a time. The x-update is a few CG steps on (A^T A + lam + rho D_z^T D_z) x = ...
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldir_pl.errors import ConfigError
from ldir_pl.physics import LinearPhysics
from ldir_pl.physics.linalg import conjugate_gradient


def z_diff(x: Tensor) -> Tensor:
    """x_{k+1} - x_k along the batch (z) axis, zero after the last slice."""
    return torch.cat([x[1:], torch.zeros_like(x[:1])]) - x


def z_diff_t(u: Tensor) -> Tensor:
    """Transpose of :func:`z_diff`."""
    return torch.cat([torch.zeros_like(u[:1]), u[:-1]]) - u


class ZCoupledConsistency:
    """``(x0, y, physics) -> x``: ``admm_iters`` ADMM iterations of ``cg_iters`` CG steps each (weights relative
    to ||A||^2; ``rho`` the ADMM penalty). ``physics`` must be a volume (its slices z-ordered)."""

    def __init__(self, lam: float, mu: float, rho: float, admm_iters: int, cg_iters: int) -> None:
        if min(lam, mu, rho) < 0 or rho == 0 or admm_iters < 1 or cg_iters < 1:
            raise ConfigError(f"sampler.consistency: lam={lam}, mu={mu} >= 0, rho={rho} > 0, admm_iters={admm_iters}"
                              f" and cg_iters={cg_iters} >= 1")
        self.lam, self.mu, self.rho = float(lam), float(mu), float(rho)
        self.admm_iters, self.cg_iters = int(admm_iters), int(cg_iters)

    @torch.no_grad()
    def __call__(self, x0: Tensor, y: Tensor, physics: LinearPhysics) -> Tensor:
        z_ratio = getattr(physics, "z_ratio", None)
        if z_ratio is None:
            raise ConfigError(f"sampler.consistency couples slices along z: it needs a volume (recon.volume=true), "
                              f"got {physics.label}")
        norm = physics.compute_norm()
        lam, rho, kappa = self.lam * norm, self.rho * norm, self.mu * norm * float(z_ratio)
        x0 = x0.detach().float()
        x, u = x0.clone(), z_diff(x0)
        eta = torch.zeros_like(u)
        atb = physics.A_adjoint(y) + lam * x0

        def normal(v: Tensor) -> Tensor:
            return physics.A_normal(v) + lam * v + rho * z_diff_t(z_diff(v))

        for _ in range(self.admm_iters):
            x = conjugate_gradient(normal, atb + rho * z_diff_t(u - eta), x, self.cg_iters, coupled=True)
            d = z_diff(x)
            u = torch.sign(d + eta) * (d + eta).abs().sub(kappa / rho).clamp_min(0)
            eta = eta + d - u
        return x.clamp(0, 1)


__all__ = ["ZCoupledConsistency", "z_diff", "z_diff_t"]
