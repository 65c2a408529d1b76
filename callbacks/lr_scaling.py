"""Learning-rate rules for a changed batch size.

Linear scaling keeps the per-sample step of SGD constant (Goyal et al. 2017); square-root scaling keeps
the update noise constant and suits adaptive optimizers such as Adam. Large scaled learning rates are
unstable early in training, hence a linear warmup.
"""

from __future__ import annotations

import math

RULES = ("linear", "sqrt", "none")


def scale_lr(ref_lr: float, ref_batch: int, batch: int, rule: str = "linear") -> float:
    """Learning rate for ``batch`` given ``ref_lr`` tuned at ``ref_batch``."""
    if ref_batch <= 0 or batch <= 0:
        raise ValueError("batch sizes must be positive")
    k = batch / ref_batch
    if rule == "linear":
        return ref_lr * k
    if rule == "sqrt":
        return ref_lr * math.sqrt(k)
    if rule == "none":
        return ref_lr
    raise ValueError(f"unknown lr rule {rule!r}; expected one of {RULES}")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier ramping linearly from 1/warmup_steps to 1 over the first ``warmup_steps`` steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
