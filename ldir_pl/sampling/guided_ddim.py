"""One guided-diffusion loop built from parts; LDIR, latent DPS, pixel DPS and the paper-faithful LDIR are
configurations of it (``conf/sampler/*.yaml``), not subclasses.

Per DDIM step t -> t' (``a`` = alpha_bar), with z the prior's diffusion variable (a scaled VAE latent, or
network-space pixels for a pixel prior) and D its decoder (identity for a pixel prior):

    out      = UNet(z_t, t)                                   (epsilon / v / sample prediction)
    z0_hat   = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)           (optionally clamped)
    L        = fidelity(y, A D(z0_hat))                         (``DataFidelity``)
    g        = dL/dz_t (through UNet and decoder)  or  dL/dz0_hat (``grad_wrt='z0'``: decoder only)
    z'_{t'}  = sqrt(a_t') z0_hat + sqrt(1 - a_t' - sigma^2) eps + sigma n     (``ddim_step``, eta)
    z_{t'}   = z'_{t'} - step_size(k) * update(g_1..g_k)        (history update: Adam | Momentum | SGD)

``init`` chooses the start (pure noise at t = T, or a warm start from the pseudo-inverse / TV image noised to
t0 < T), ``final_steps`` continue the history update on the clean latent after t = 0, ``num_samples`` average
several samples (a Monte-Carlo posterior mean), and ``refine`` takes the result onto the data in pixel space.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldir_pl.physics import LinearPhysics, image_seed
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.history import HistoryUpdater, StepSize
from ldir_pl.sampling.prior_loading import resolve_prior
from ldir_pl.sampling.refine import Refine
from ldir_pl.sampling.warm_start import WarmStart

GRAD_WRT = ("zt", "z0")


def ddim_step(z0: Tensor, eps: Tensor, a_prev: float, sigma: float, noise: Tensor | None = None) -> Tensor:
    """DDIM's update (Song et al. 2021, eq. 12) from a clean estimate and its noise; equals diffusers'
    ``DDIMScheduler.step`` on its own timesteps (tested). The loop uses this form because its timesteps
    are not always a scheduler's: a warm start samples ``num_steps`` steps from t0 < T, where ``step()``
    would take t - T / num_steps as the previous timestep."""
    out = math.sqrt(a_prev) * z0 + math.sqrt(max(0.0, 1.0 - a_prev - sigma**2)) * eps
    return out + sigma * noise if sigma > 0 and noise is not None else out


def ddim_sigma(eta: float, a_t: float, a_prev: float) -> float:
    if eta == 0.0:
        return 0.0
    return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))


class GuidedDDIM:
    """Guided DDIM sampling with a diffusion prior; every part comes from the config.

    Args:
        prior: bundle folder or a loaded ``PriorBundle`` (latent or pixel).
        fidelity: the data misfit ``DataFidelity(p, squared, normalize)``.
        update: history update template (``Adam`` | ``Momentum`` | ``SGD``); each batch gets a fresh copy.
        step_size: ``StepSize(lr, schedule, end_ratio)`` over the sampling steps.
        init: ``None`` starts from pure noise at t = T (the LDIR paper), a ``WarmStart`` from an encoded
            classical image noised to t0 = strength * T.
        refine: ``Refine`` in pixel space at the end, or ``None`` (the decoded sample, clipped).
        num_steps, eta, timestep_spacing: DDIM steps, stochasticity (0 deterministic), diffusers spacing.
        grad_wrt: ``zt`` (through UNet and decoder, as the authors) or ``z0`` (decoder only: cheaper).
        clamp_z0: clamp the predicted clean variable to [-c, c] (None: no clamp; DPS clamps pixels to 1).
        num_samples: samples per measurement, averaged before refinement; sample 0 uses the image's own seed.
        batch_size: at most this many latents at once (measurements x samples; None: all at once).
        guidance_every: guide every k-th step only (counted back from the last step, always guided).
        final_steps, final_lr: history-update steps on the clean latent after t = 0 (decoder only).
        seed: global seed; each image's noise comes from ``image_seed(seed, id)``.
        progress: tqdm bar over sampling steps.
        name: key under which results are reported.
    """

    def __init__(self, *, prior: Any, fidelity: DataFidelity, update: HistoryUpdater, step_size: StepSize,
                 init: WarmStart | None, refine: Refine | None, num_steps: int, eta: float, timestep_spacing: str,
                 grad_wrt: str, clamp_z0: float | None, num_samples: int, batch_size: int | None,
                 guidance_every: int, final_steps: int, final_lr: float | None, seed: int, progress: bool,
                 name: str) -> None:
        if grad_wrt not in GRAD_WRT:
            raise ValueError(f"sampler.grad_wrt={grad_wrt!r}: expected one of {GRAD_WRT}")
        for key, value, low in (("num_steps", num_steps, 1), ("num_samples", num_samples, 1),
                                ("guidance_every", guidance_every, 1), ("final_steps", final_steps, 0)):
            if int(value) < low:
                raise ValueError(f"sampler.{key}={value}: must be >= {low}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"sampler.eta={eta}: expected a value in [0, 1]")
        self.name = str(name)
        # loaded on the CPU: the sampler follows its input's device (``to``), so each DDP rank moves it
        # to its own GPU once Lightning has placed the module, never at construction
        self.prior = resolve_prior(prior, "cpu")
        self.fidelity, self.update, self.step_size = fidelity, update, step_size
        self.init, self.refine = init, refine
        self.num_steps, self.eta, self.timestep_spacing = int(num_steps), float(eta), str(timestep_spacing)
        self.grad_wrt = grad_wrt
        self.clamp_z0 = None if clamp_z0 is None else float(clamp_z0)
        self.num_samples = int(num_samples)
        self.batch_size = None if batch_size in (None, 0) else int(batch_size)
        self.guidance_every, self.final_steps = int(guidance_every), int(final_steps)
        self.final_lr = None if final_lr is None else float(final_lr)
        self.seed, self.progress = int(seed), bool(progress)
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(self.prior.scheduler.config, clip_sample=False,
                                                   timestep_spacing=self.timestep_spacing)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prior scheduler prediction_type={self.prediction_type!r} is not supported")
        self.latent_shape = tuple(int(s) for s in self.prior.latent_shape)

    # ------------------------------------------------------------------ device and model pieces
    @property
    def device(self) -> torch.device:
        return self.prior.device

    def to(self, device: torch.device | str) -> GuidedDDIM:
        """Move the prior's networks to ``device`` (a no-op where they already are)."""
        if torch.device(device) != self.device:
            self.prior.to(device)
        return self

    def decode(self, z: Tensor) -> Tensor:
        return self.prior.decode(z)

    def encode(self, x: Tensor) -> Tensor:
        return self.prior.encode(x)

    def timesteps(self) -> list[int]:
        """Sampling timesteps: the scheduler's from T, or ``num_steps`` evenly spaced from a warm start's t0."""
        if self.init is None:
            self.scheduler.set_timesteps(self.num_steps, device="cpu")
            return [int(t) for t in self.scheduler.timesteps]
        t0 = self.init.start_timestep(self.scheduler.config.num_train_timesteps)
        return [int(t) for t in torch.linspace(t0, 0, self.num_steps + 1)[:-1].round()]

    def _predict(self, z: Tensor, t: int, a_t: float) -> tuple[Tensor, Tensor]:
        """(eps, z0_hat) from the UNet output at timestep ``t``."""
        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        out = self.prior.unet(z, tt).sample
        sa, s1a = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        if self.prediction_type == "epsilon":
            eps, z0 = out, (z - s1a * out) / sa
        elif self.prediction_type == "v_prediction":
            z0, eps = sa * z - s1a * out, sa * out + s1a * z
        else:
            z0, eps = out, (z - sa * out) / max(s1a, 1e-12)
        if self.clamp_z0 is not None:
            z0 = z0.clamp(-self.clamp_z0, self.clamp_z0)
            eps = (z - sa * z0) / max(s1a, 1e-12)
        return eps, z0

    # ------------------------------------------------------------------ sampling
    def _validate(self, y: Tensor, physics: LinearPhysics, ids: Sequence) -> None:
        size = int(self.prior.image_size)
        if tuple(physics.image_shape) != (size, size):
            raise ValueError(
                f"{self.name}: the prior was trained on {size}x{size} images, but the physics reconstructs "
                f"{physics.image_shape[0]}x{physics.image_shape[1]} images; set physics.image_size={size} or use "
                "a prior trained at the physics' size")
        physics.check(y, f"{self.name} input")
        if len(ids) != y.shape[0]:
            raise ValueError(f"{self.name}: {len(ids)} image ids for a batch of {y.shape[0]} measurements")

    def reconstruct(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str]) -> Tensor:
        ids = list(ids)
        self._validate(y, physics, ids)
        self.to(y.device)  # run where the measurements are
        with torch.inference_mode(False), torch.enable_grad():
            y = y.detach().clone().to(torch.float32)
            k = self.num_samples
            y_s = y.repeat_interleave(k, dim=0)
            ids_s = [self.sample_id(i, j) for i in ids for j in range(k)]
            # the warm-start image is computed once per measurement, not once per sample
            warm = self.init.image(y, physics, ids).repeat_interleave(k, dim=0) if self.init else None
            chunk = self.batch_size or len(ids_s)
            self.last_losses: list[list[float]] = []
            x = torch.cat([self._sample(y_s[i:i + chunk], physics, ids_s[i:i + chunk],
                                        None if warm is None else warm[i:i + chunk])
                           for i in range(0, len(ids_s), chunk)])
            x = x.view(len(ids), k, *x.shape[1:]).mean(dim=1)
            return self.refine(x, y, physics) if self.refine is not None else x.clamp(0, 1)

    @staticmethod
    def sample_id(image_id: int | str, k: int) -> int | str:
        """Noise identity of sample ``k`` of an image: the image's own id for the first sample."""
        return image_id if k == 0 else f"{image_id}#sample{k}"

    def initial_noise(self, ids: Sequence) -> tuple[Tensor, list[torch.Generator]]:
        gens = [torch.Generator().manual_seed(image_seed(self.seed, i)) for i in ids]
        z = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])
        return z.to(self.device), gens

    def _sample(self, y: Tensor, physics: LinearPhysics, ids: list, warm: Tensor | None) -> Tensor:
        """One guided sample per measurement, decoded (not refined)."""
        alphas = self.scheduler.alphas_cumprod.double()
        final_alpha = float(self.scheduler.final_alpha_cumprod)
        updater = copy.deepcopy(self.update)
        updater.reset()
        z, gens = self.initial_noise(ids)
        timesteps = self.timesteps()
        if warm is not None:
            a0 = float(alphas[timesteps[0]])
            with torch.no_grad():  # sqrt(a0) E(x_warm) + sqrt(1 - a0) n: the warm image noised to t0
                z = math.sqrt(a0) * self.encode(warm) + math.sqrt(1.0 - a0) * z
        n = len(timesteps)
        for i, t in enumerate(tqdm(timesteps, desc=self.name, disable=not self.progress, leave=False)):
            a_t = float(alphas[t])
            a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < n else final_alpha
            lr = self.step_size(i, n, alpha_bar=a_t) if (n - 1 - i) % self.guidance_every == 0 else 0.0
            if self.grad_wrt == "zt" and lr != 0.0:
                var = z.detach().requires_grad_(True)
                eps, z0 = self._predict(var, t, a_t)
                z0_g = z0
            else:
                with torch.no_grad():
                    eps, z0 = self._predict(z, t, a_t)
                var = z0_g = z0.detach().requires_grad_(lr != 0.0)
            g = self._fidelity_grad(y, physics, z0_g, var) if lr != 0.0 else None
            sigma = ddim_sigma(self.eta, a_t, a_prev)
            noise = None
            if sigma > 0:
                noise = torch.stack([torch.randn(self.latent_shape, generator=gen) for gen in gens]).to(z)
            z_prev = ddim_step(z0.detach(), eps.detach(), a_prev, sigma, noise)
            if g is not None:
                z_prev = updater.update(z_prev, g, lr)
            z = z_prev.detach()
        z = self._final_iterations(z, y, physics, updater)
        with torch.no_grad():
            return self.decode(z).float()

    def _fidelity_grad(self, y: Tensor, physics: LinearPhysics, z0: Tensor, wrt: Tensor) -> Tensor:
        """Gradient of the misfit w.r.t. ``wrt`` (z_t or z0 itself); the per-image loss is recorded."""
        loss = self.fidelity(y, physics.A(self.decode(z0).float()))
        (g,) = torch.autograd.grad(loss.sum(), wrt)
        self.last_losses.append(loss.detach().cpu().tolist())
        return g.detach()

    def _final_iterations(self, z: Tensor, y: Tensor, physics: LinearPhysics, updater: HistoryUpdater) -> Tensor:
        """At t = 0 a DDIM step is the identity, so further iterations are history-update steps on the clean
        latent alone (decoder only), continuing the same updater state: they pull the sample onto the data
        while it stays in the decoder's range."""
        lr = self.final_lr if self.final_lr is not None else self.step_size.lr * self.step_size.end_ratio
        for _ in tqdm(range(self.final_steps), desc=f"{self.name} t=0", disable=not self.progress or not self.final_steps,
                      leave=False):
            z_var = z.detach().requires_grad_(True)
            z = updater.update(z.detach(), self._fidelity_grad(y, physics, z_var, z_var), lr)
        return z.detach()

    def describe(self) -> dict:
        return {
            "name": self.name, "num_steps": self.num_steps, "eta": self.eta, "grad_wrt": self.grad_wrt,
            "update": type(self.update).__name__, "step_size": vars(self.step_size),
            "fidelity": self.fidelity.describe(), "clamp_z0": self.clamp_z0,
            "init": None if self.init is None else self.init.describe(),
            "refine": None if self.refine is None else vars(self.refine),
            "num_samples": self.num_samples, "guidance_every": self.guidance_every,
            "final_steps": self.final_steps, "final_lr": self.final_lr, "seed": self.seed,
            "prior_kind": self.prior.kind,
        }


__all__ = ["GRAD_WRT", "GuidedDDIM", "ddim_sigma", "ddim_step"]
