"""How good a CT prior is, without reconstructing anything.

Two views of the same prior, both cheap enough to log at every validation and to print for any bundle
(``experiments/prior_quality.py``):

- **held-out denoising loss**: the UNet's epsilon MSE on held-out latents, on a fixed grid of timesteps with
  fixed noise, so that two checkpoints (or two priors on one VAE) are compared on the same problem. It is the
  per-timestep term of the diffusion ELBO up to weights: lower means a better density model of those slices.
- **sample statistics**: unconditional samples against real slices. ``hu_w1`` is the Wasserstein-1 distance
  (in HU) between the pooled HU values of samples and of real slices; ``body_share`` is the share of samples
  that look like an axial CT slice: one body region surrounded by air, holding soft tissue and bone
  (``body_check``; 79 of 80 ct-dicom slices and 303 of 321 ct-volumes slices pass it, the misses being legs and
  the top of a skull).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldir_pl import interrupt

#: timesteps of the held-out denoising loss for a 1000-step schedule: the centres of ten equal bins (``t_grid``)
T_GRID = tuple(range(50, 1000, 100))


def t_grid(num_train_timesteps: int, points: int = 10) -> tuple[int, ...]:
    """The centres of ``points`` equal bins of a schedule (``T_GRID`` for 1000 steps)."""
    return tuple(int((k + 0.5) * num_train_timesteps / points) for k in range(points))
HU_MIN, HU_MAX = -1024.0, 3071.0

# body_check thresholds, in HU and shares of the 256x256 field (chosen so that real slices of every source pass)
AIR_BELOW = -500.0          # air / lung vs tissue
SOFT_TISSUE = (-150.0, 150.0)
BONE_ABOVE = 250.0
PARTIAL_AIR_MAX = 0.15      # share of the body between -500 and -150 HU (real slices: 98th percentile 0.13)


def to_hu(x: Tensor | np.ndarray) -> np.ndarray:
    """Images in [0, 1] -> HU (the reference protocol's x = (HU + 1024) / 4096, inverted)."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return np.clip(arr, 0.0, 1.0) * (HU_MAX - HU_MIN + 1.0) + HU_MIN


@torch.no_grad()
def denoising_loss(unet: Callable, scheduler, z0: Tensor, timesteps: tuple[int, ...] | None = None, seed: int = 0,
                   batch_size: int = 32) -> dict[int, float]:
    """Mean epsilon MSE of ``unet`` at every t of ``timesteps`` (default: ``t_grid`` of the schedule) on the clean
    latents ``z0`` (N, C, h, w); the noise is drawn once from ``seed`` and shared by every t, so the figure is a
    fixed function of the network."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=gen).to(z0)
    kind = scheduler.config.prediction_type
    out: dict[int, float] = {}
    for t in timesteps or t_grid(int(scheduler.config.num_train_timesteps)):
        total = 0.0
        for i in range(0, len(z0), batch_size):
            z, n = z0[i:i + batch_size], noise[i:i + batch_size]
            tt = torch.full((len(z),), int(t), dtype=torch.long, device=z.device)
            pred = unet(scheduler.add_noise(z, n, tt), tt).sample.float()
            target = n if kind == "epsilon" else (scheduler.get_velocity(z, n, tt) if kind == "v_prediction" else z)
            total += float(((pred - target.float()) ** 2).flatten(1).mean(1).sum())
        out[int(t)] = total / len(z0)
    return out


@dataclass(frozen=True)
class BodyCheck:
    """Whether an image reads as an axial CT slice, and the first reason it does not."""

    passed: bool
    reason: str
    body_fraction: float


def body_check(hu: np.ndarray) -> BodyCheck:
    """One body region in air holding soft tissue and bone.

    The body is the largest connected region above -500 HU with its holes (lungs, bowel gas) filled. It must
    cover 3-85% of the field, hold at least 3/4 of everything above -500 HU (arms and the table are allowed, a
    field of fragments is not), leave at least 40% of the image border in air, and hold at least 15% soft tissue
    (-150..150 HU) and some bone (> 250 HU, at least 0.3% of the body and 20 pixels). At most 15% of the body may
    lie between air and fat (-500..-150 HU): real bodies are tissue with sharp air edges (lungs, bowel gas), while a
    weak prior fills its bodies with a bubbly tissue-air froth.
    """
    from scipy import ndimage

    hu = np.asarray(hu, dtype=np.float32)
    fg = ndimage.binary_opening(hu > AIR_BELOW, iterations=1)
    labels, n = ndimage.label(fg)
    if n == 0:
        return BodyCheck(False, "empty: nothing above -500 HU", 0.0)
    sizes = np.bincount(labels.ravel())[1:]
    body = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    frac = float(body.mean())
    if frac < 0.03:
        return BodyCheck(False, f"no body: the largest region covers {frac:.1%} of the field", frac)
    if frac > 0.85:
        return BodyCheck(False, f"tissue fills the field ({frac:.1%})", frac)
    if sizes.max() < 0.75 * sizes.sum():
        return BodyCheck(False, f"fragments: the largest region holds {sizes.max() / sizes.sum():.0%} of the tissue",
                         frac)
    border = np.concatenate([hu[:3].ravel(), hu[-3:].ravel(), hu[:, :3].ravel(), hu[:, -3:].ravel()])
    if float((border < AIR_BELOW).mean()) < 0.4:
        return BodyCheck(False, "no air around the body (the image border is mostly tissue)", frac)
    inside = hu[body]
    soft = float(((inside > SOFT_TISSUE[0]) & (inside < SOFT_TISSUE[1])).mean())
    if soft < 0.15:
        return BodyCheck(False, f"too little soft tissue ({soft:.1%} of the body)", frac)
    froth = float(((inside > AIR_BELOW) & (inside < SOFT_TISSUE[0])).mean())
    if froth > PARTIAL_AIR_MAX:
        return BodyCheck(False, f"froth: {froth:.0%} of the body lies between air and fat", frac)
    bone = int((inside > BONE_ABOVE).sum())
    if bone < max(20, 0.003 * inside.size):
        return BodyCheck(False, f"no bone ({bone} pixels above {BONE_ABOVE:.0f} HU)", frac)
    return BodyCheck(True, "ok", frac)


def hu_w1(samples_hu: np.ndarray, real_hu: np.ndarray, quantiles: int = 2001) -> float:
    """Wasserstein-1 distance in HU between the pooled pixel values of two image sets (mean absolute difference
    of their quantile functions)."""
    q = np.linspace(0.0, 1.0, quantiles)
    return float(np.abs(np.quantile(samples_hu.ravel(), q) - np.quantile(real_hu.ravel(), q)).mean())


def sample_statistics(samples: Tensor | np.ndarray, real: Tensor | np.ndarray) -> dict[str, float]:
    """``body_share`` of the samples and ``hu_w1`` against the real slices (both in [0, 1], (N, [1,] H, W))."""
    s_hu, r_hu = to_hu(samples), to_hu(real)
    s_hu = s_hu.reshape(-1, *s_hu.shape[-2:])
    checks = [body_check(img) for img in s_hu]
    return {"body_share": float(np.mean([c.passed for c in checks])), "hu_w1": hu_w1(s_hu, r_hu)}


@torch.no_grad()
def ddim_samples(unet: Callable, scheduler_config, decode: Callable[[Tensor], Tensor], shape: tuple[int, ...],
                 n: int, num_steps: int = 50, seed: int = 0, batch_size: int = 16, eta: float = 0.0,
                 progress: bool = False) -> Tensor:
    """``n`` unconditional samples as ``ldir-sample`` draws them (DDIM, trailing spacing, one generator seeded
    with ``seed`` for the whole batch of initial noise and, with ``eta`` > 0, the steps' noise), decoded to images
    in [0, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config, clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(num_steps)
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=gen).to(device)
    for t in tqdm(ddim.timesteps, desc=f"sampling {n} images", unit="step", leave=False, disable=not progress):
        eps = []
        for i in range(0, n, batch_size):
            interrupt.check()
            eps.append(unet(z[i:i + batch_size], t.to(device)).sample)
        eps = torch.cat(eps)
        noise = torch.randn(z.shape, generator=gen).to(device) if eta > 0 else None
        z = ddim.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
    return torch.cat([decode(z[i:i + batch_size]).float().clamp(0, 1) for i in range(0, n, batch_size)])


__all__ = ["T_GRID", "t_grid", "BodyCheck", "body_check", "ddim_samples", "denoising_loss", "hu_w1", "sample_statistics",
           "to_hu"]
