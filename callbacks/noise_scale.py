"""Gradient noise scale and critical batch size (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training").

With gradients averaged over batches of two sizes ``b_small < b_big``, unbiased estimates are

    |G|^2 = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    S     = (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

and the simple noise scale ``B_simple = S / |G|^2`` approximates the critical batch size beyond which
larger batches mostly waste compute. Both estimates are noisy, so numerator and denominator are
averaged over several measurements before dividing, as the paper recommends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


def noise_scale_terms(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, S) from squared gradient norms at two batch sizes."""
    if not b_big > b_small > 0:
        raise ValueError("need 0 < b_small < b_big")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    s = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


class NoiseScaleEstimator:
    """Accumulates (|G|^2, S) measurements; ``critical_batch`` is their ratio of means."""

    def __init__(self) -> None:
        self.g2: list[float] = []
        self.s: list[float] = []

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> None:
        g2, s = noise_scale_terms(g_small_sq, g_big_sq, b_small, b_big)
        self.g2.append(g2)
        self.s.append(s)

    @property
    def critical_batch(self) -> float:
        if not self.g2:
            return math.nan
        g2 = sum(self.g2) / len(self.g2)
        s = sum(self.s) / len(self.s)
        if g2 <= 0:
            return math.inf  # gradient signal below noise floor: no useful cap
        return max(s / g2, 0.0)


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split every tensor of a (nested) batch along dim 0 into ``parts`` equal chunks."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0] // parts
        return [batch[i * n : (i + 1) * n] for i in range(parts)]
    if isinstance(batch, dict):
        split = {k: split_batch(v, parts) for k, v in batch.items()}
        return [type(batch)({k: v[i] for k, v in split.items()}) for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        cols = [split_batch(b, parts) for b in batch]
        return [type(batch)(c[i] for c in cols) if isinstance(batch, list) else tuple(c[i] for c in cols) for i in range(parts)]
    return [batch] * parts


def flat_grad_sq_norm(grads: Iterable[torch.Tensor | None]) -> float:
    return float(sum(g.detach().double().pow(2).sum() for g in grads if g is not None))


def mean_noise_terms(
    loss_of: Callable[[Any, int], torch.Tensor],
    params: Sequence[torch.Tensor],
    batches: Iterable[Any],
    batch_size: int,
) -> tuple[float, float] | None:
    """Mean (|G|^2, S) over ``batches`` of ``batch_size`` samples; None without batches.

    Each batch is split in halves: their gradients' mean squared norm is |G_small|^2 at half the batch and
    the squared norm of their mean is |G_big|^2 at the full batch, so one batch gives both sizes without
    an optimizer step. ``loss_of(half, index)`` returns the loss to differentiate. The means are returned
    (not their ratio) so that callers can average them across processes before dividing.
    """
    est = NoiseScaleEstimator()
    small_b = batch_size // 2
    for k, batch in enumerate(batches):
        grads = []
        for half in split_batch(batch, 2):
            loss = loss_of(half, k)
            grads.append([g.float() if g is not None else None
                          for g in torch.autograd.grad(loss, params, allow_unused=True)])
        small = (flat_grad_sq_norm(grads[0]) + flat_grad_sq_norm(grads[1])) / 2
        big = flat_grad_sq_norm([(a + b) / 2 if a is not None else None for a, b in zip(grads[0], grads[1])])
        est.update(small, big, small_b, 2 * small_b)
    if not est.g2:
        return None
    return sum(est.g2) / len(est.g2), sum(est.s) / len(est.s)
