"""Learning-rate and noise schedules shared by the prior's training modules."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from ldir_pl.errors import ConfigError

#: Short config names -> diffusers ``beta_schedule`` values.
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "squaredcos_cap_v2": "squaredcos_cap_v2",
}
PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


class WarmupCosine:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio``.

    A class (not a closure) so ``LambdaLR.state_dict`` stores plain numbers and checkpoints stay
    loadable with ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = int(max(0, warmup_steps))
        self.total_steps = int(max(1, total_steps))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    params,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    min_lr_ratio: float = 0.0,
) -> dict:
    """AdamW + per-step warmup/cosine schedule in Lightning's ``configure_optimizers`` format."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}


def make_ddpm_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    clip_sample: bool = False,
    **kwargs,
) -> DDPMScheduler:
    """Build a ``DDPMScheduler``; ``clip_sample`` defaults to False (diffusers' True is wrong for latents)."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"scheduler.beta_schedule={beta_schedule!r}: expected one of {sorted(BETA_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"scheduler.prediction_type={prediction_type!r}: expected one of {sorted(PREDICTION_TYPES)}"
        )
    return DDPMScheduler(
        num_train_timesteps=int(num_train_timesteps),
        beta_schedule=BETA_SCHEDULES[beta_schedule],
        prediction_type=PREDICTION_TYPES[prediction_type],
        beta_start=float(beta_start),
        beta_end=float(beta_end),
        clip_sample=bool(clip_sample),
        **kwargs,
    )
