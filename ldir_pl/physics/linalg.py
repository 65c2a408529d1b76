"""Batched linear algebra on the physics contract: per-image inner products, power iteration, conjugate
gradients. Every solver in the package (pseudo-inverses, refinements, TV's step sizes) uses these."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-image inner products <a_i, b_i>, shaped (B, 1, ..., 1) to broadcast against a and b."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


@torch.no_grad()
def power_iteration(apply: Callable[[Tensor], Tensor], shape: tuple[int, ...], iters: int = 60,
                    device: torch.device | str = "cpu", seed: int = 0) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite ``apply`` acting on (1, *shape) tensors,
    from a seeded random start (the same value on every call)."""
    v = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
    lam = 0.0
    for _ in range(int(iters)):
        w = apply(v)
        lam = float(w.norm())
        if lam == 0.0 or not math.isfinite(lam):
            break
        v = w / lam
    return lam


@torch.no_grad()
def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None,
                       iters: int = 10, coupled: bool = False) -> Tensor:
    """``iters`` CG steps on ``apply(x) = b`` (symmetric positive definite) from ``x0`` (zero when None). Every
    image has its own step lengths, unless ``coupled``: an operator that mixes the images of the batch (a
    volume's slices) is one system, with one step length."""
    def dot(a: Tensor, c: Tensor) -> Tensor:
        return (a * c).sum() if coupled else batch_dot(a, c)

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p, rs = r.clone(), dot(r, r)
    for _ in range(int(iters)):
        ap = apply(p)
        alpha = rs / dot(p, ap).clamp_min(1e-30)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = dot(r, r)
        p, rs = r + (rs_new / rs.clamp_min(1e-30)) * p, rs_new
    return x


__all__ = ["batch_dot", "conjugate_gradient", "power_iteration"]
