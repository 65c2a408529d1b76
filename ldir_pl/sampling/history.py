"""History-gradient updaters for guided diffusion sampling (LDIR, arXiv 2307.12070).

After each DDIM step the sampler moves the latent against the data-fidelity gradient ``g``:

    z_{t-1} = z'_{t-1} - lr * d_k

where ``d_k`` is built from the gradient *history*:

* ``sgd``:      d_k = g_k                                   (latent DPS)
* ``momentum``: b_k = mu b_{k-1} + g_k;  d_k = g_k + mu b_k  (Nesterov, PyTorch's formula)
* ``adam``:     m_k = b1 m_{k-1} + (1-b1) g_k;  v_k = b2 v_{k-1} + (1-b2) g_k^2;
                d_k = m_hat / (sqrt(v_hat) + eps)

Adam's bias correction: ``"standard"`` divides by (1 - b^k); ``"constant"`` divides by the first
step's factors (1 - b1), (1 - b2) at every step (a fixed rescaling, as in the LDIR paper's
pseudo-code, which does not track k); ``"none"`` uses m, v as they are.

State is kept per tensor element, so a batch of images is updated independently. Updaters are
plain objects built from ``conf/sampler/update/*.yaml``: ``reset()`` before sampling a new batch, then
``update(z, g, lr)`` once per step.
``lr`` may be a float or a per-image tensor of shape (B,).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldir_pl.errors import ConfigError

BIAS_CORRECTIONS = ("standard", "constant", "none")


def _per_image(lr: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(lr, Tensor):
        return lr.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return float(lr)


class HistoryUpdater:
    """Base class: plain gradient step (SGD)."""

    name = "sgd"

    def __init__(self) -> None:
        self.k = 0

    def reset(self) -> None:
        self.k = 0

    def direction(self, g: Tensor) -> Tensor:
        self.k += 1
        return g

    def update(self, z: Tensor, g: Tensor, lr: float | Tensor) -> Tensor:
        """``z - lr * direction(g)`` (no in-place change of ``z``)."""
        return z - _per_image(lr, z) * self.direction(g)


class SGD(HistoryUpdater):
    name = "sgd"


class Momentum(HistoryUpdater):
    """Heavy-ball buffer with Nesterov look-ahead (``nesterov=False`` gives classical momentum)."""

    name = "momentum"

    def __init__(self, mu: float, nesterov: bool) -> None:
        super().__init__()
        if not 0.0 <= mu < 1.0:
            raise ConfigError(f"momentum={mu}: must be in [0, 1)")
        self.mu, self.nesterov = float(mu), bool(nesterov)
        self.buf: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.buf = None

    def direction(self, g: Tensor) -> Tensor:
        self.k += 1
        self.buf = g.clone() if self.buf is None else self.mu * self.buf + g
        return g + self.mu * self.buf if self.nesterov else self.buf


class Adam(HistoryUpdater):
    name = "adam"

    def __init__(self, beta1: float, beta2: float, eps: float, bias_correction: str) -> None:
        super().__init__()
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ConfigError(f"adam betas ({beta1}, {beta2}) must be in [0, 1)")
        if bias_correction not in BIAS_CORRECTIONS:
            raise ConfigError(f"bias_correction={bias_correction!r}: expected one of {BIAS_CORRECTIONS}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.bias_correction = bias_correction
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.m = self.v = None

    def direction(self, g: Tensor) -> Tensor:
        self.k += 1
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self.beta2 * self.v + (1 - self.beta2) * g * g
        if self.bias_correction == "standard":
            c1, c2 = 1 - self.beta1**self.k, 1 - self.beta2**self.k
        elif self.bias_correction == "constant":
            c1, c2 = 1 - self.beta1, 1 - self.beta2
        else:
            c1 = c2 = 1.0
        return (self.m / c1) / ((self.v / c2).sqrt() + self.eps)


class StepSize:
    """Step size at sampling step ``i`` of ``n``.

    ``constant``: lr. ``linear``: lr decays linearly to ``end_ratio * lr`` at the last step.
    ``cosine``: the same with a cosine shape. ``sqrt_one_minus_alpha_bar``: lr * sqrt(1 - alpha_bar_t)
    (large steps while the sample is noisy, vanishing at the end).
    """

    def __init__(self, lr: float, schedule: str, end_ratio: float) -> None:
        if schedule not in STEP_SCHEDULES:
            raise ConfigError(f"sampler.step_size.schedule={schedule!r}: expected one of {STEP_SCHEDULES}")
        self.lr, self.schedule, self.end_ratio = float(lr), schedule, float(end_ratio)

    def __call__(self, i: int, n: int, alpha_bar: float | None = None) -> float:
        frac = i / max(1, n - 1)
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "linear":
            return self.lr * (1.0 - (1.0 - self.end_ratio) * frac)
        if self.schedule == "cosine":
            return self.lr * (self.end_ratio + (1.0 - self.end_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))
        if alpha_bar is None:
            raise ConfigError("step_size.schedule='sqrt_one_minus_alpha_bar' needs alpha_bar")
        return self.lr * math.sqrt(max(0.0, 1.0 - alpha_bar))


STEP_SCHEDULES = ("constant", "linear", "cosine", "sqrt_one_minus_alpha_bar")
__all__ = ["Adam", "HistoryUpdater", "Momentum", "SGD", "STEP_SCHEDULES", "StepSize"]
