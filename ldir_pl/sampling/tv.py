"""Total-variation reconstruction: min ||Ax - y||^2 + weight * ||grad x||_1 over the box [0, 1], by PDHG,
optionally pulled towards another image: + lam ||x - anchor||^2 with lam = lam_rel * ||A||^2.

The problem is the one the reference protocol poses with ODL: weighted spaces (the physics' cell areas
enter the data term, the l1 term and the adjoint), ODL's forward-difference gradient with zero padding,
anisotropic l1, started from the pseudo-inverse (FBP for CT). Only the physics contract (``A``,
``A_adjoint``, ``A_dagger``, ``weights``, ``compute_norm``) is used, so it runs on every operator; a test
checks it against ``odl.solvers.pdhg`` on CT.

The gradient block is rescaled to the operator's norm ("balanced") before PDHG: with unbalanced blocks one
step size fits neither and PDHG stalls; the weight is divided by the same factor, so the minimiser is
unchanged. PDHG runs until every image's relative change ||x_k - x_{k-10}|| / ||x_k|| over ten iterations
falls below ``tol`` (or ``max_iterations``); an image that has converged stops moving, so its result does not
depend on the other images of its batch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldir_pl import interrupt
from ldir_pl.errors import ConfigError
from ldir_pl.physics import LinearPhysics
from ldir_pl.physics.linalg import power_iteration

INITS = ("pinv", "zero")
CHECK_EVERY = 10


def forward_diff(x: Tensor, h: tuple[float, float], hz: float | None = None) -> Tensor:
    """ODL's ``Gradient`` (forward differences, zero padding): (B,1,H,W) -> (B,2,H,W); with ``hz`` (the slice
    spacing in the units of ``h``) the batch is a z-ordered volume and a third channel holds the z-difference."""
    dy = torch.cat([x[..., 1:, :], torch.zeros_like(x[..., :1, :])], dim=-2) - x
    dx = torch.cat([x[..., :, 1:], torch.zeros_like(x[..., :, :1])], dim=-1) - x
    parts = [dy / h[0], dx / h[1]]
    if hz is not None:
        parts.append((torch.cat([x[1:], torch.zeros_like(x[:1])], dim=0) - x) / hz)
    return torch.cat(parts, dim=1)


def forward_diff_t(p: Tensor, h: tuple[float, float], hz: float | None = None) -> Tensor:
    """Exact transpose of :func:`forward_diff` (a negative divergence)."""
    py, px = p[:, :1] / h[0], p[:, 1:2] / h[1]
    ty = torch.cat([torch.zeros_like(py[..., :1, :]), py[..., :-1, :]], dim=-2) - py
    tx = torch.cat([torch.zeros_like(px[..., :, :1]), px[..., :, :-1]], dim=-1) - px
    out = ty + tx
    if hz is not None:
        pz = p[:, 2:3] / hz
        out = out + torch.cat([torch.zeros_like(pz[:1]), pz[:-1]], dim=0) - pz
    return out


@dataclass(frozen=True)
class Balance:
    """PDHG's constants for one operator: gradient scale, step-size norm ||L||, and ||A||^2 in the weighted norms."""

    scale: float
    op_norm: float
    norm_a_sq: float


@dataclass
class TVResult:
    x: Tensor
    iterations: list[int]  # per image: where it converged (or max_iterations)


class TVReconstructor:
    """TV by PDHG from the pseudo-inverse (``init: pinv``) or zero; ``anchored`` adds a proximal pull.

    ``along_z``: the batch is a volume (``VolumePhysics``) and TV includes the difference between neighbouring
    slices, weighted by the in-plane / slice spacing ratio; the volume converges as one object."""

    def __init__(self, weight: float, max_iterations: int, tol: float, init: str = "pinv", name: str = "tv",
                 along_z: bool = False, progress: bool = False) -> None:
        if weight < 0 or max_iterations < 1 or tol < 0:
            raise ConfigError(f"TV: weight={weight} and tol={tol} must be >= 0, max_iterations={max_iterations} >= 1")
        if init not in INITS:
            raise ConfigError(f"TV init={init!r}: expected one of {INITS}")
        self.weight, self.max_iterations, self.tol = float(weight), int(max_iterations), float(tol)
        self.init, self.name, self.along_z, self.progress = init, str(name), bool(along_z), bool(progress)
        self._balances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def along(self, z: bool) -> TVReconstructor:
        """The same problem with (or without) TV along z."""
        return TVReconstructor(self.weight, self.max_iterations, self.tol, self.init, self.name, along_z=z,
                               progress=self.progress)

    @torch.no_grad()
    def reconstruct(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str] | None = None) -> Tensor:
        return self.solve(y, physics).x

    @torch.no_grad()
    def solve(self, y: Tensor, physics: LinearPhysics) -> TVResult:
        physics.check(y, f"{self.name} input")
        if self.init == "pinv":
            x0 = physics.A_dagger(y).clamp(0, 1)
        else:
            x0 = torch.zeros(y.shape[0], 1, *physics.image_shape, device=y.device)
        return self._pdhg(y, x0.to(y.device), physics)

    @torch.no_grad()
    def anchored(self, y: Tensor, anchor: Tensor, physics: LinearPhysics, lam_rel: float) -> TVResult:
        """min ||Ax - y||^2 + weight TV(x) + lam ||x - anchor||^2 over [0, 1], started from ``anchor``, with
        ``lam = lam_rel * ||A||^2``: the TV problem pulled towards another method's image (a prior's)."""
        physics.check(y, f"{self.name}: anchored input")
        anchor = anchor.detach().to(y.device, torch.float32)
        # (mu / 2) ||x - a||^2 in the weighted primal space is lam_rel ||A||^2 ||x - a||^2 in the plain one
        mu = 2.0 * float(lam_rel) * self.balance(physics).norm_a_sq
        return self._pdhg(y, anchor.clamp(0, 1), physics, anchor=anchor, mu=mu)

    def _slice_spacing(self, physics: LinearPhysics) -> float | None:
        """The slice spacing in the in-plane units (``hz`` of ``forward_diff``), or None for slice-wise TV."""
        if not self.along_z:
            return None
        z_ratio = getattr(physics, "z_ratio", None)
        if z_ratio is None:
            raise ConfigError(f"{self.name}: TV along z needs a volume (recon.volume=true), got {physics.label}")
        h = physics.weights()[2]
        return math.sqrt(h[0] * h[1]) / float(z_ratio)

    def balance(self, physics: LinearPhysics) -> Balance:
        """Scale and norms for ``physics``, computed once per physics object. Along z the slice operator's
        balance is kept and the step-size norm grows by the z-difference's bound (4 / hz^2, scaled)."""
        hz = self._slice_spacing(physics)
        if hz is not None:
            b = self._slice_balance(physics.slice_physics)
            return Balance(b.scale, math.sqrt(b.op_norm**2 + 1.21 * b.scale**2 * 4.0 / hz**2), b.norm_a_sq)
        return self._slice_balance(physics)

    def _slice_balance(self, physics: LinearPhysics) -> Balance:
        if physics not in self._balances:
            w_x, w_y, h = physics.weights()
            norm_a_sq = (w_y / w_x) * physics.compute_norm()
            device = next((b.device for b in physics.buffers()), torch.device("cpu"))
            shape = (1, *physics.image_shape)
            norm_g_sq = power_iteration(lambda v: forward_diff_t(forward_diff(v, h), h), shape, device=device)
            scale = math.sqrt(norm_a_sq / norm_g_sq)
            norm_l_sq = power_iteration(
                lambda v: (w_y / w_x) * physics.A_normal(v) + scale**2 * forward_diff_t(forward_diff(v, h), h),
                shape, device=device)
            self._balances[physics] = Balance(scale, 1.1 * math.sqrt(norm_l_sq), norm_a_sq)
        return self._balances[physics]

    def _pdhg(self, y: Tensor, x0: Tensor, physics: LinearPhysics, anchor: Tensor | None = None,
              mu: float = 0.0) -> TVResult:
        w_x, w_y, h = physics.weights()
        hz = self._slice_spacing(physics)
        bal = self.balance(physics)
        tau = sigma = 1.0 / bal.op_norm
        c = self.weight / bal.scale
        A, At = physics.A, physics.A_adjoint
        n = y.shape[0]
        x, x_bar = x0.clone(), x0.clone()
        q1 = torch.zeros_like(y)
        q2 = torch.zeros(n, 2 if hz is None else 3, *physics.image_shape, device=y.device)
        active = torch.ones(n, dtype=torch.bool, device=y.device)
        iterations = [self.max_iterations] * n
        x_check = x.clone()
        bar = tqdm(total=self.max_iterations, desc=f"{self.name} PDHG", unit="it", leave=False, mininterval=0.5,
                   disable=None if self.progress else True)  # None: on a terminal only, never in a log file
        for k in range(1, self.max_iterations + 1):
            interrupt.check()
            # dual step: prox of sigma * g^*, g = ||. - y||^2 (+) c ||.||_1 (weights cancel in both proxes)
            q1_new = (q1 + sigma * A(x_bar) - sigma * y) / (1 + sigma / 2)
            q2_new = (q2 + sigma * bal.scale * forward_diff(x_bar, h, hz)).clamp(-c, c)
            # primal step with the weighted adjoint L^* q = (w_y / w_x) A^T q1 + scale * D^T q2
            # (with an anchor: the prox of the box plus (mu/2) ||x - anchor||^2)
            x_new = x - tau * ((w_y / w_x) * At(q1_new) + bal.scale * forward_diff_t(q2_new, h, hz))
            if anchor is not None:
                x_new = (x_new + tau * mu * anchor) / (1.0 + tau * mu)
            x_new = x_new.clamp(0, 1)
            keep = active.view(-1, 1, 1, 1)
            q1, q2 = torch.where(keep, q1_new, q1), torch.where(keep, q2_new, q2)
            x_bar = torch.where(keep, 2 * x_new - x, x)
            x = torch.where(keep, x_new, x)
            if k % CHECK_EVERY == 0:
                bar.update(CHECK_EVERY)
            if self.tol > 0 and k % CHECK_EVERY == 0:
                change = (x - x_check).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
                if hz is not None:  # the slices of a volume are coupled: it stops as a whole
                    change = ((x - x_check).norm() / x.norm().clamp_min(1e-12)).expand(n)
                done = active & (change < self.tol)
                for i in torch.nonzero(done).flatten().tolist():
                    iterations[i] = k
                active &= ~done
                x_check = x.clone()
                bar.set_postfix_str(f"{int(active.sum())}/{n} images moving")
                if not bool(active.any()):
                    break
        bar.close()
        return TVResult(x.clamp(0, 1), iterations)


__all__ = ["Balance", "TVReconstructor", "TVResult", "forward_diff", "forward_diff_t"]
