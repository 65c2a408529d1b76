"""Total-variation baseline: min ||Ax - y||^2 + weight * ||grad x||_1 over the box [0, 1], by PDHG.

The problem is the one the reference protocol poses with ODL: weighted spaces (the physics' cell areas
enter the data term, the l1 term and the adjoint), ODL's forward-difference gradient with zero padding,
anisotropic l1, started from the pseudo-inverse (FBP for CT). It uses only the physics contract
(``A``, ``A_adjoint``, ``A_dagger``, ``weights``), so it runs on every operator. Two solvers:

* ``torch`` (default): the whole batch at once, ~50x faster than per image ODL on CPU and usable on GPU;
* ``odl``: ``odl.solvers.pdhg`` image by image on CT, the reference the torch solver is tested against.

The gradient block is rescaled to the ray transform's norm ("balanced") before PDHG: with unbalanced
blocks one step size fits neither and PDHG stalls; the weight is divided by the same factor, so the
minimiser is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import odl
import torch
from torch import Tensor

from ldir_pl.physics import CTPhysics, LinearPhysics

SOLVERS = ("torch", "odl")
INITS = ("pinv", "zero")


def forward_diff(x: Tensor, h: tuple[float, float]) -> Tensor:
    """ODL's ``Gradient`` (forward differences, zero padding): (B,1,H,W) -> (B,2,H,W)."""
    dy = torch.cat([x[..., 1:, :], torch.zeros_like(x[..., :1, :])], dim=-2) - x
    dx = torch.cat([x[..., :, 1:], torch.zeros_like(x[..., :, :1])], dim=-1) - x
    return torch.cat([dy / h[0], dx / h[1]], dim=1)


def forward_diff_t(p: Tensor, h: tuple[float, float]) -> Tensor:
    """Exact transpose of :func:`forward_diff` (a negative divergence)."""
    py, px = p[:, :1] / h[0], p[:, 1:] / h[1]
    ty = torch.cat([torch.zeros_like(py[..., :1, :]), py[..., :-1, :]], dim=-2) - py
    tx = torch.cat([torch.zeros_like(px[..., :, :1]), px[..., :, :-1]], dim=-1) - px
    return ty + tx


class TVReconstructor:

    def __init__(self, weight: float = 3e-5, iterations: int = 400, init: str = "pinv", solver: str = "torch",
                 name: str = "tv") -> None:
        if weight < 0 or iterations < 1:
            raise ValueError(f"sampler: weight={weight} must be >= 0 and iterations={iterations} >= 1")
        if init not in INITS:
            raise ValueError(f"sampler.init={init!r}: expected one of {INITS}")
        if solver not in SOLVERS:
            raise ValueError(f"sampler.solver={solver!r}: expected one of {SOLVERS}")
        self.weight, self.iterations, self.init, self.solver = float(weight), int(iterations), init, solver
        self.name = str(name)
        self._norms: dict[str, tuple[float, float, float]] = {}

    @torch.no_grad()
    def reconstruct(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str] | None = None) -> Tensor:
        physics.check(y, f"{self.name} input")
        if self.solver == "odl" and not isinstance(physics, CTPhysics):
            raise ValueError(f"sampler.solver=odl solves CT problems only; {physics.label} needs solver=torch")
        if self.init == "pinv":
            x0 = physics.A_dagger(y).clamp(0, 1)
        else:
            x0 = torch.zeros(y.shape[0], 1, *physics.image_shape, device=y.device)
        run = self._torch if self.solver == "torch" else self._odl
        return run(y, x0.to(y.device), physics).clamp(0, 1)

    @torch.no_grad()
    def anchored(self, y: Tensor, anchor: Tensor, physics: LinearPhysics, lam_rel: float) -> Tensor:
        """min ||Ax - y||^2 + weight TV(x) + lam ||x - anchor||^2 over [0, 1], started from ``anchor``;
        ``lam = lam_rel * ||A||^2``: the TV problem pulled towards another method's image (a prior's)."""
        physics.check(y, "TV-anchored refinement input")
        anchor = anchor.detach().to(y.device, torch.float32)
        mu = 2.0 * float(lam_rel) * self._balance(physics, y.device)[2] ** 2
        return self._torch(y, anchor.clamp(0, 1), physics, anchor=anchor, mu=mu).clamp(0, 1)

    # ------------------------------------------------------------------ torch solver
    def _balance(self, physics: LinearPhysics, device: torch.device) -> tuple[float, float, float]:
        """(scale, ||L||, ||A||) in the weighted norms, by power iteration; cached per geometry."""
        key = (physics.key(), str(device))
        if key not in self._norms:
            w_x, w_y, h = physics.weights()
            A, At = physics.A, physics.A_adjoint
            gen = torch.Generator().manual_seed(0)

            def power(apply_normal, iters: int = 60) -> float:
                v = torch.rand(1, 1, *physics.image_shape, generator=gen).to(device)
                lam = 0.0
                for _ in range(iters):
                    w = apply_normal(v)
                    lam = float(w.norm())
                    v = w / lam
                return math.sqrt(lam)

            norm_a = power(lambda v: (w_y / w_x) * At(A(v)))
            norm_g = power(lambda v: forward_diff_t(forward_diff(v, h), h))
            scale = norm_a / norm_g
            norm_l = power(lambda v: (w_y / w_x) * At(A(v)) + scale**2 * forward_diff_t(forward_diff(v, h), h))
            self._norms[key] = (scale, 1.1 * norm_l, norm_a)
        return self._norms[key]

    def _torch(self, y: Tensor, x0: Tensor, physics: LinearPhysics, anchor: Tensor | None = None,
               mu: float = 0.0) -> Tensor:
        w_x, w_y, h = physics.weights()
        scale, op_norm, _ = self._balance(physics, y.device)
        tau = sigma = 1.0 / op_norm
        c = self.weight / scale
        A, At = physics.A, physics.A_adjoint
        x, x_bar = x0.clone(), x0.clone()
        q1 = torch.zeros_like(y)
        q2 = torch.zeros(y.shape[0], 2, *physics.image_shape, device=y.device)
        for _ in range(self.iterations):
            # dual step: prox of sigma * g^*, g = ||. - y||^2 (+) c ||.||_1 (weights cancel in both proxes)
            q1 = (q1 + sigma * A(x_bar) - sigma * y) / (1 + sigma / 2)
            q2 = (q2 + sigma * scale * forward_diff(x_bar, h)).clamp(-c, c)
            # primal step with the weighted adjoint L^* q = (w_y / w_x) A^T q1 + scale * D^T q2
            # (with an anchor: the prox of the box plus (mu/2) ||x - anchor||^2)
            x_old = x
            x = x - tau * ((w_y / w_x) * At(q1) + scale * forward_diff_t(q2, h))
            if anchor is not None:
                x = (x + tau * mu * anchor) / (1.0 + tau * mu)
            x = x.clamp(0, 1)
            x_bar = 2 * x - x_old
        return x

    # ------------------------------------------------------------------ ODL reference solver
    def _odl(self, y: Tensor, x0: Tensor, physics: CTPhysics) -> Tensor:
        ray = physics.geometry.odl_ray_transform(physics.ray.impl, unit_weighting=False)
        grad = odl.Gradient(ray.domain)
        norm_ray = odl.power_method_opnorm(ray, maxiter=60, xstart=odl.phantom.white_noise(ray.domain, seed=0))
        norm_grad = odl.power_method_opnorm(grad, maxiter=60, xstart=odl.phantom.white_noise(ray.domain, seed=0))
        scale = norm_ray / norm_grad
        L = odl.BroadcastOperator(ray, scale * grad)
        op_norm = 1.1 * odl.power_method_opnorm(L, maxiter=60, xstart=odl.phantom.white_noise(ray.domain, seed=0))
        f = odl.functionals.IndicatorBox(ray.domain, 0.0, 1.0)
        l1 = odl.functionals.L1Norm(grad.range)
        out = []
        for sino, start in zip(y.detach().cpu().numpy(), x0.cpu().numpy()):
            data = odl.functionals.L2NormSquared(ray.range).translated(ray.range.element(sino[0]))
            g = odl.functionals.SeparableSum(data, (self.weight / scale) * l1)
            x = ray.domain.element(start[0])
            odl.solvers.pdhg(x, f, g, L, niter=self.iterations, tau=1.0 / op_norm, sigma=1.0 / op_norm)
            out.append(np.asarray(x.data, dtype=np.float32))
        return torch.from_numpy(np.stack(out)).unsqueeze(1).to(y.device)
