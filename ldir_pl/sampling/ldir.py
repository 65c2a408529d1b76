"""LDIR: Latent Diffusion Iterative Reconstruction (arXiv 2307.12070), and latent DPS as its SGD preset.

Per DDIM step t -> t' (``alpha`` = alpha_bar):

    out      = UNet(z_t, t)                                   (epsilon / v / sample prediction)
    z0_hat   = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)           (optionally clamped)
    x0_hat   = T^{-1}(D(z0_hat / s))                            (decoder, intensity transform inverted)
    L        = ||y - A x0_hat||_p (^p)                          (``DataFidelity``)
    g        = dL/dz_t   (through UNet and decoder)   or   dL/dz0_hat   (``grad_wrt='z0'``)
    z'_{t'}  = sqrt(a_t') z0_hat + sqrt(1 - a_t' - sigma^2) eps + sigma n     (DDIM, eta)
    z_{t'}   = z'_{t'} - lr_k * d_k(g_1..g_k)                   (history update: adam | momentum | sgd)

then x = T^{-1}(D(z_0 / s)); with ``num_samples`` K > 1 the K samples drawn from different noise are
averaged (a Monte-Carlo posterior mean: its squared error is at most the samples' mean squared error), and
the result is optionally refined in pixel space (``refine``).
A pixel prior (``kind='pixel'``) works with the same loop: D is the identity and z lives in image space
(``PixelDPSSampler``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldir_pl.physics import image_seed
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.history import OPTIMIZERS, STEP_SCHEDULES, make_updater, step_size_schedule
from ldir_pl.sampling.pinv import PseudoInverse
from ldir_pl.sampling.prior_loading import intensity_transform, resolve_prior
from ldir_pl.sampling.refine import REFINE_METHODS, refine
from ldir_pl.sampling.tv import TVReconstructor

GRAD_WRT = ("zt", "z0")
WARM_STARTS = (None, "pinv", "tv")


class LDIRSampler:
    """Guided DDIM over a diffusion prior's latent with a history-gradient data-fidelity update.

    Args:
        prior: bundle folder (loaded with ``load_prior``) or a ``PriorBundle``.
        num_steps, eta: DDIM steps and stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
        timestep_spacing: diffusers spacing; ``trailing`` starts at t = T-1 (pure noise).
        lr, step_schedule, lr_end_ratio: guidance step size and its schedule
            (``constant`` | ``linear`` | ``cosine`` | ``sqrt_one_minus_alpha_bar``).
        optimizer: history update, ``adam`` (LDIR) | ``momentum`` (Nesterov) | ``sgd`` (latent DPS).
        beta1, beta2, adam_eps, bias_correction, momentum: updater settings.
        grad_wrt: ``zt`` (through UNet and decoder, as the authors) or ``z0`` (decoder only: cheaper).
        p, squared, normalize: data-fidelity ||y - A x||_p (see ``DataFidelity``).
        clamp_z0: clamp the predicted clean latent to [-c, c] (None: no clamp).
        refine, refine_iters, refine_lam, refine_tv_weight: final pixel-space data consistency
            (``cg`` | ``gd`` | ``tv`` | ``none``; ``tv`` adds ``refine_tv_weight`` * TV, see ``refine``).
        dc_iters, dc_lam: hard data consistency inside the loop (DDS / ReSample style): at every step the
            predicted clean image D(z0_hat) takes ``dc_iters`` CG steps towards the data (proximal weight
            ``dc_lam``) and is encoded back before the DDIM update; 0 = off.
        seed: global seed; each image's noise comes from ``image_seed(seed, id)``.
        progress: tqdm bar over sampling steps.
        num_samples: samples per measurement, averaged in image space before refinement; sample 0 uses the
            image's own seed, so ``num_samples=1`` is the single-sample sampler. Costs K times the time.
        batch_size: sample at most this many latents at once (measurements x samples; None: all at once).
        guidance_every: guide every k-th step only (counted back from the last step, which is always
            guided); the other steps are plain DDIM steps costing one UNet forward. Saves decoder passes.
        warm_start, warm_start_strength: ``None`` starts from pure noise at t = T (the authors); ``pinv``
            (or ``tv``) encodes the physics' pseudo-inverse (FBP for CT; or the TV image), noises it to
            t = strength * T and samples from there
            with ``num_steps`` steps (the SDEdit / come-closer-diffuse-faster start): the prior only has to
            remove streaks (or TV's staircase) instead of inventing the anatomy.
        final_steps, final_lr: history-gradient iterations on the clean latent after the last DDIM step
            (decoder only; ``final_lr`` None = ``lr * lr_end_ratio``).
    """

    expected_kind: str | None = "latent"

    def __init__(
        self,
        prior: Any,
        num_steps: int = 20,
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        lr: float = 0.1,
        step_schedule: str = "linear",
        lr_end_ratio: float = 0.1,
        optimizer: str = "adam",
        beta1: float = 0.9,
        beta2: float = 0.999,
        adam_eps: float = 1e-8,
        bias_correction: str = "standard",
        momentum: float = 0.9,
        grad_wrt: str = "zt",
        p: int = 2,
        squared: bool = True,
        normalize: bool = False,
        clamp_z0: float | None = None,
        refine: str = "tv",
        refine_iters: int = 200,
        refine_lam: float = 0.002,
        refine_tv_weight: float = 3e-5,
        dc_iters: int = 0,
        dc_lam: float = 0.02,
        seed: int = 0,
        progress: bool = True,
        num_samples: int = 1,
        batch_size: int | None = None,
        guidance_every: int = 1,
        final_steps: int = 0,
        final_lr: float | None = None,
        warm_start: str | None = None,
        warm_start_strength: float = 0.5,
        name: str = "ldir",
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"sampler.optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
        if step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"sampler.step_schedule={step_schedule!r}: expected one of {STEP_SCHEDULES}")
        if grad_wrt not in GRAD_WRT:
            raise ValueError(f"sampler.grad_wrt={grad_wrt!r}: expected one of {GRAD_WRT}")
        if refine not in REFINE_METHODS:
            raise ValueError(f"sampler.refine={refine!r}: expected one of {REFINE_METHODS}")
        if int(num_steps) < 1:
            raise ValueError(f"sampler.num_steps={num_steps}: need at least one step")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"sampler.eta={eta}: expected a value in [0, 1]")
        self.name = str(name)
        # loaded on the CPU: the sampler follows its input's device (``to``), so each DDP rank moves it
        # to its own GPU when Lightning has placed the module, never at construction
        self.prior = resolve_prior(prior, "cpu", kind=self.expected_kind)
        self.num_steps, self.eta, self.timestep_spacing = int(num_steps), float(eta), str(timestep_spacing)
        self.lr, self.step_schedule, self.lr_end_ratio = float(lr), step_schedule, float(lr_end_ratio)
        self.updater_kwargs = dict(optimizer=optimizer, beta1=beta1, beta2=beta2, eps=adam_eps, momentum=momentum,
                                   bias_correction=bias_correction)
        make_updater(**self.updater_kwargs)  # validate now
        self.optimizer = optimizer
        self.grad_wrt = grad_wrt
        self.fidelity = DataFidelity(p, squared, normalize)
        self.clamp_z0 = None if clamp_z0 is None else float(clamp_z0)
        self.refine_method, self.refine_iters, self.refine_lam = refine, int(refine_iters), float(refine_lam)
        self.refine_tv_weight = float(refine_tv_weight)
        if int(dc_iters) < 0:
            raise ValueError(f"sampler.dc_iters={dc_iters}: must be >= 0")
        self.dc_iters, self.dc_lam = int(dc_iters), float(dc_lam)
        self.seed = int(seed)
        self.progress = bool(progress)
        if int(num_samples) < 1:
            raise ValueError(f"sampler.num_samples={num_samples}: need at least one sample")
        self.num_samples = int(num_samples)
        self.batch_size = None if batch_size in (None, 0) else int(batch_size)
        if int(guidance_every) < 1:
            raise ValueError(f"sampler.guidance_every={guidance_every}: must be >= 1")
        self.guidance_every = int(guidance_every)
        if int(final_steps) < 0:
            raise ValueError(f"sampler.final_steps={final_steps}: must be >= 0")
        self.final_steps = int(final_steps)
        self.final_lr = None if final_lr is None else float(final_lr)
        if warm_start not in WARM_STARTS:
            raise ValueError(f"sampler.warm_start={warm_start!r}: expected one of {WARM_STARTS}")
        if not 0.0 < float(warm_start_strength) <= 1.0:
            raise ValueError(f"sampler.warm_start_strength={warm_start_strength}: expected a value in (0, 1]")
        self.warm_start, self.warm_start_strength = warm_start, float(warm_start_strength)
        # the classical reconstruction the warm start encodes; it keeps its operators per geometry
        self._warm_recon = {"pinv": PseudoInverse, "tv": TVReconstructor}[warm_start]() if warm_start else None
        self.scale, self.shift = intensity_transform(getattr(self.prior, "metadata", {}))
        self.scaling_factor = float(self.prior.scaling_factor) if self.prior.kind == "latent" else 1.0
        self.latent_shape = tuple(int(s) for s in self.prior.latent_shape)
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(
            self.prior.scheduler.config, clip_sample=False, timestep_spacing=self.timestep_spacing
        )
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prior scheduler prediction_type={self.prediction_type!r} is not supported")

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        return next(self.prior.unet.parameters()).device

    def to(self, device: torch.device | str) -> LDIRSampler:
        """Move the prior's networks to ``device`` (a no-op where they already are)."""
        device = torch.device(device)
        if device != self.device:
            self.prior.unet.to(device)
            if self.prior.vae is not None:
                self.prior.vae.to(device)
        return self

    # ------------------------------------------------------------------ model pieces
    def decode(self, z: Tensor) -> Tensor:
        """Latent (scaled) -> image in [0, 1] space (not clamped, so gradients survive)."""
        if self.prior.kind == "latent":
            out = self.prior.vae.decode(z / self.scaling_factor).sample
        else:
            out = z
        return (out - self.shift) / self.scale

    def encode(self, x: Tensor) -> Tensor:
        """Image in [0, 1] -> scaled latent (the VAE posterior mean; the inverse of ``decode``)."""
        u = x * self.scale + self.shift
        if self.prior.kind == "latent":
            return self.prior.vae.encode(u).latent_dist.mean * self.scaling_factor
        return u

    def _predict(self, z: Tensor, t: int, a_t: float) -> tuple[Tensor, Tensor]:
        """(eps, z0_hat) from the UNet output at timestep ``t``."""
        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        out = self.prior.unet(z, tt).sample
        sa, s1a = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        if self.prediction_type == "epsilon":
            eps = out
            z0 = (z - s1a * eps) / sa
        elif self.prediction_type == "v_prediction":
            z0 = sa * z - s1a * out
            eps = sa * out + s1a * z
        else:
            z0 = out
            eps = (z - sa * z0) / max(s1a, 1e-12)
        if self.clamp_z0 is not None:
            z0 = z0.clamp(-self.clamp_z0, self.clamp_z0)
            eps = (z - sa * z0) / max(s1a, 1e-12)
        return eps, z0

    # ------------------------------------------------------------------ validation
    def _validate(self, y: Tensor, physics, ids: Sequence) -> None:
        size = int(self.prior.image_size)
        if tuple(physics.image_shape) != (size, size):
            raise ValueError(
                f"{self.name}: the prior was trained on {size}x{size} images, but the physics reconstructs "
                f"{physics.image_shape[0]}x{physics.image_shape[1]} images; set physics.image_size={size} or use "
                "a prior trained at the physics' size"
            )
        if y.ndim != 4 or y.shape[1] != 1:
            raise ValueError(f"{self.name}: measurements must be (B,1,V,D), got {tuple(y.shape)}")
        physics.check(y, f"{self.name} input")
        if len(ids) != y.shape[0]:
            raise ValueError(f"{self.name}: {len(ids)} image ids for a batch of {y.shape[0]} measurements")

    # ------------------------------------------------------------------ sampling
    def reconstruct(self, y: Tensor, physics, ids: Sequence[int | str]) -> Tensor:
        ids = list(ids)
        self._validate(y, physics, ids)
        self.to(y.device)  # run where the measurements are
        with torch.inference_mode(False), torch.enable_grad():
            y = y.detach().clone().to(torch.float32)
            k = self.num_samples
            y_s = y.repeat_interleave(k, dim=0)
            ids_s = [self.sample_id(i, j) for i in ids for j in range(k)]
            # the warm-start image is computed once per measurement, not once per sample
            warm = self.warm_image(y, physics, ids).repeat_interleave(k, dim=0) if self.warm_start else None
            chunk = self.batch_size or len(ids_s)
            self.last_losses: list[list[float]] = []
            x = torch.cat([self._sample(y_s[i:i + chunk], physics, ids_s[i:i + chunk],
                                        None if warm is None else warm[i:i + chunk])
                           for i in range(0, len(ids_s), chunk)])
            x = x.view(len(ids), k, *x.shape[1:]).mean(dim=1)
            return refine(x, y, physics, method=self.refine_method, iters=self.refine_iters, lam_rel=self.refine_lam,
                          tv_weight=self.refine_tv_weight)

    @staticmethod
    def sample_id(image_id: int | str, k: int) -> int | str:
        """Noise identity of sample ``k`` of an image: the image's own id for the first sample."""
        return image_id if k == 0 else f"{image_id}#sample{k}"

    def initial_noise(self, ids: Sequence) -> tuple[Tensor, list[torch.Generator]]:
        gens = [torch.Generator().manual_seed(image_seed(self.seed, i)) for i in ids]
        z = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])
        return z.to(self.device), gens

    def _ddim_sigma(self, a_t: float, a_prev: float) -> float:
        if self.eta == 0.0:
            return 0.0
        return self.eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))

    def _sample(self, y: Tensor, physics, ids: list, warm: Tensor | None = None) -> Tensor:
        """One guided sample per measurement, decoded (not refined); ``warm``: the warm-start images."""
        sched = self.scheduler
        alphas = sched.alphas_cumprod.double()
        final_alpha = float(sched.final_alpha_cumprod)
        updater = make_updater(**self.updater_kwargs)
        z, gens = self.initial_noise(ids)
        if self.warm_start is None:
            sched.set_timesteps(self.num_steps, device="cpu")
            timesteps = [int(t) for t in sched.timesteps]
        else:
            t_start = int(round(self.warm_start_strength * (sched.config.num_train_timesteps - 1)))
            timesteps = [int(t) for t in torch.linspace(t_start, 0, self.num_steps + 1)[:-1].round()]
            a0 = float(alphas[timesteps[0]])
            with torch.no_grad():  # sqrt(a0) E(x_warm) + sqrt(1 - a0) n: the warm image noised to t0
                z = math.sqrt(a0) * self.encode(warm) + math.sqrt(1.0 - a0) * z
        n = len(timesteps)
        for i, t in enumerate(tqdm(timesteps, desc=self.name, disable=not self.progress, leave=False)):
            a_t = float(alphas[t])
            a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < n else final_alpha
            lr = step_size_schedule(self.step_schedule, self.lr, i, n, alpha_bar=a_t, end_ratio=self.lr_end_ratio)
            if (n - 1 - i) % self.guidance_every:
                lr = 0.0
            if self.grad_wrt == "zt" and lr != 0.0:
                z_in = z.detach().requires_grad_(True)
                eps, z0 = self._predict(z_in, t, a_t)
                var = z_in
                z0_g = z0
            else:
                with torch.no_grad():
                    eps, z0 = self._predict(z, t, a_t)
                var = z0_g = z0.detach().requires_grad_(lr != 0.0)
            g = self._fidelity_grad(y, physics, z0_g, var) if lr != 0.0 else None
            eps, z0 = eps.detach(), z0.detach()
            if self.dc_iters:
                z0 = self._data_consistent(z0, y, physics)
            sigma = self._ddim_sigma(a_t, a_prev)
            z_prev = math.sqrt(a_prev) * z0 + math.sqrt(max(0.0, 1 - a_prev - sigma**2)) * eps
            if sigma > 0:
                noise = torch.stack([torch.randn(self.latent_shape, generator=gen) for gen in gens]).to(z_prev)
                z_prev = z_prev + sigma * noise
            if g is not None:
                z_prev = updater.update(z_prev, g.detach(), lr)
            z = z_prev.detach()
        z = self._final_iterations(z, y, physics, updater)
        with torch.no_grad():
            return self.decode(z).float()

    def _fidelity_grad(self, y: Tensor, physics, z0: Tensor, wrt: Tensor) -> Tensor:
        """Gradient of ||y - A D(z0)|| w.r.t. ``wrt`` (z_t or z0 itself); the per-image loss is recorded."""
        loss = self.fidelity(y, physics.A(self.decode(z0).float()))
        (g,) = torch.autograd.grad(loss.sum(), wrt)
        self.last_losses.append(loss.detach().cpu().tolist())
        return g.detach()

    @torch.no_grad()
    def _data_consistent(self, z0: Tensor, y: Tensor, physics) -> Tensor:
        """E(CG_k(D(z0))): the clean estimate moved onto the data in pixel space, back in the latent."""
        x = refine(self.decode(z0).float(), y, physics, method="cg", iters=self.dc_iters, lam_rel=self.dc_lam)
        return self.encode(x)

    @torch.no_grad()
    def warm_image(self, y: Tensor, physics, ids: Sequence) -> Tensor:
        """The classical reconstruction (FBP or TV) a warm start encodes."""
        return self._warm_recon.reconstruct(y, physics, list(ids)).to(self.device)

    def _final_iterations(self, z: Tensor, y: Tensor, physics, updater) -> Tensor:
        """At t = 0 a DDIM step is the identity, so further LDIR iterations are history-gradient steps on
        the clean latent alone (decoder only), continuing the same updater state: they pull the sample
        onto the data while it stays in the decoder's range."""
        lr = self.final_lr if self.final_lr is not None else self.lr * self.lr_end_ratio
        for _ in tqdm(range(self.final_steps), desc=f"{self.name} t=0", disable=not self.progress or not self.final_steps,
                      leave=False):
            z_var = z.detach().requires_grad_(True)
            z = updater.update(z.detach(), self._fidelity_grad(y, physics, z_var, z_var), lr)
        return z.detach()

    def describe(self) -> dict:
        return {
            "name": self.name, "num_steps": self.num_steps, "eta": self.eta, "lr": self.lr,
            "step_schedule": self.step_schedule, "optimizer": self.optimizer, "grad_wrt": self.grad_wrt,
            "fidelity": self.fidelity.describe(), "clamp_z0": self.clamp_z0,
            "refine": {"method": self.refine_method, "iters": self.refine_iters, "lam": self.refine_lam,
                       "tv_weight": self.refine_tv_weight},
            "dc": {"iters": self.dc_iters, "lam": self.dc_lam},
            "num_samples": self.num_samples, "guidance_every": self.guidance_every,
            "final_steps": self.final_steps, "final_lr": self.final_lr,
            "warm_start": self.warm_start, "warm_start_strength": self.warm_start_strength,
            "seed": self.seed, "prior_kind": self.prior.kind,
        }


__all__ = ["LDIRSampler", "GRAD_WRT", "WARM_STARTS"]
