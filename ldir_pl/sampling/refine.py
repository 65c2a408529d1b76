"""Pixel-space data-consistency refinement of a decoded reconstruction.

Starting from the sampler's image ``x0`` it takes a few steps on

    min_x  ||A x - y||_2^2 + lam * ||x - x0||_2^2,      lam = lam_rel * ||A||^2

* ``cg``: conjugate gradients on the normal equations (A^T A + lam I) x = A^T y + lam x0, batched
  (per-image step lengths), clamped to [0, 1] at the end. Few iterations + the proximal term keep the
  update from fitting the noise.
* ``gd``: projected gradient descent, x <- clip(x - (1 / (L + lam)) grad, 0, 1) each step.
* ``tv``: the same problem plus ``tv_weight * TV(x)`` over [0, 1], ``iters`` PDHG steps from ``x0``
  (``TVReconstructor.anchored``): edges kept, the prior's texture noise flattened.

``||A||^2`` (largest eigenvalue of A^T A) is estimated once per geometry by power iteration and cached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldir_pl.sampling.tv import TVReconstructor

REFINE_METHODS = ("none", "cg", "gd", "tv")
_NORM_CACHE: dict = {}
_TV_SOLVERS: dict = {}


@torch.no_grad()
def operator_norm_sq(physics, device: torch.device | str = "cpu", iters: int = 30) -> float:
    """Largest eigenvalue of A^T A (power iteration, deterministic start), cached per operator."""
    key = (physics.key(), str(device))
    if key in _NORM_CACHE:
        return _NORM_CACHE[key]
    h, w = physics.image_shape
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, h, w, generator=gen).to(device)
    lam = 0.0
    for _ in range(iters):
        x = physics.A_adjoint(physics.A(x))
        lam = float(x.norm())
        x = x / max(lam, 1e-30)
    _NORM_CACHE[key] = lam
    return lam


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1).reshape(-1, 1, 1, 1)


@torch.no_grad()
def refine(x0: Tensor, y: Tensor, physics, method: str = "cg", iters: int = 10, lam_rel: float = 0.0,
           clamp: bool = True, tv_weight: float = 3e-5) -> Tensor:
    """Refined images (B,1,H,W); ``method='none'`` or ``iters<=0`` returns ``x0`` (clamped)."""
    if method not in REFINE_METHODS:
        raise ValueError(f"refine method={method!r}: expected one of {REFINE_METHODS}")
    x0 = x0.detach().float()
    y = y.detach().float()
    if method == "none" or iters <= 0:
        return x0.clamp(0, 1) if clamp else x0
    if method == "tv":
        key = (float(tv_weight), int(iters))
        if key not in _TV_SOLVERS:  # the solver caches its operator norms per geometry
            _TV_SOLVERS[key] = TVReconstructor(weight=tv_weight, iterations=iters)
        return _TV_SOLVERS[key].anchored(y, x0, physics, lam_rel)
    big_l = operator_norm_sq(physics, x0.device)
    lam = float(lam_rel) * big_l

    def normal_op(v: Tensor) -> Tensor:
        return physics.A_adjoint(physics.A(v)) + lam * v

    if method == "gd":
        x = x0.clone()
        step = 1.0 / (big_l + lam)
        for _ in range(iters):
            grad = physics.A_adjoint(physics.A(x) - y) + lam * (x - x0)
            x = x - step * grad
            if clamp:
                x = x.clamp(0, 1)
        return x
    # conjugate gradients, batched (each image has its own alpha/beta)
    x = x0.clone()
    r = physics.A_adjoint(y) + lam * x0 - normal_op(x)
    p = r.clone()
    rs = _dot(r, r)
    for _ in range(iters):
        ap = normal_op(p)
        alpha = rs / _dot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x.clamp(0, 1) if clamp else x


class Refine:
    """The configured refinement as one part of a sampler: ``Refine(method, iters, lam, tv_weight)(x, y, physics)``."""

    def __init__(self, method: str, iters: int, lam: float, tv_weight: float) -> None:
        if method not in REFINE_METHODS or method == "none":
            raise ValueError(f"sampler.refine.method={method!r}: expected one of {REFINE_METHODS[1:]} "
                             "(sampler.refine=null for none)")
        self.method, self.iters, self.lam, self.tv_weight = method, int(iters), float(lam), float(tv_weight)

    def __call__(self, x: Tensor, y: Tensor, physics) -> Tensor:
        return refine(x, y, physics, method=self.method, iters=self.iters, lam_rel=self.lam,
                      tv_weight=self.tv_weight)


__all__ = ["REFINE_METHODS", "Refine", "operator_norm_sq", "refine"]
