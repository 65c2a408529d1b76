"""Learning-rate rules for a changed batch size, and applying the new lr to live optimizers/schedulers.

Linear scaling keeps the per-sample step of SGD constant (Goyal et al. 2017); square-root scaling keeps
the update noise constant and suits adaptive optimizers such as Adam. A large scaled lr needs a warm-up;
that is the module's own scheduler's job (one warm-up, scaled with the lr), not the search's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

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


def rescale_lrs(optimizers: Iterable[torch.optim.Optimizer], schedulers: Iterable[Any], lr: float) -> None:
    """Make ``lr`` the base lr of every optimizer, after ``configure_optimizers`` already built them.

    Each optimizer's first group's base (``initial_lr`` when a scheduler set one, else ``lr``) becomes
    ``lr``; the other groups keep their ratio to it. The current ``lr`` is multiplied by the same factor,
    so a scheduler mid-warm-up stays at the same point of its ramp, and each scheduler's ``base_lrs``
    (which closed-form schedules such as ``LambdaLR`` multiply) is scaled too. Only public state is
    written: ``get_last_lr()`` reports the new lr from the scheduler's next ``step()`` on (Lightning
    itself reads the param groups).
    """
    factors: dict[int, float] = {}
    for opt in optimizers:
        g0 = opt.param_groups[0]
        base = g0.get("initial_lr", g0["lr"])
        factor = factors[id(opt)] = lr / base if base else 1.0
        for g in opt.param_groups:
            g["lr"] *= factor
            if "initial_lr" in g:
                g["initial_lr"] *= factor
    for sched in schedulers:
        factor = factors.get(id(getattr(sched, "optimizer", None)), 1.0)
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * factor for b in sched.base_lrs]
