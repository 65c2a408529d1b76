"""One guided-diffusion loop built from parts; LDIR, latent DPS, pixel DPS and the paper-faithful LDIR are
configurations of it (``conf/sampler/*.yaml``), not subclasses.

Per DDIM step t -> t' of the scheduler's plan, with z the prior's diffusion variable (a scaled VAE latent, or
network-space pixels for a pixel prior) and D its decoder (identity for a pixel prior):

    step     = DDIMScheduler.step(UNet(z_t, t), t, z_t, eta)     (prev_sample z'_{t'}, pred_original_sample z0)
    g, L     = guidance.gradient: d/dz fidelity(y, A D(z0)) w.r.t. z_t (UNet + decoder) or z0 (decoder only)
    z_{t'}   = z'_{t'} - step_size(k) * update(g_1..g_k)        (history update: Adam | Momentum | SGD)

``init`` chooses the start: pure noise at t = T, or a warm start, i.e. the encoded pseudo-inverse / TV image
noised with ``scheduler.add_noise`` to the first timestep of the plan's last ``num_steps`` steps (the img2img
strength slicing of diffusers). The guidance's ``final_steps`` continue the history update on the clean
latent after t = 0, ``num_samples`` average several samples (a Monte-Carlo posterior mean), and ``refine``
takes the result onto the data in pixel space. ``num_steps: 0`` (with a warm start) skips the UNet: the
encoded warm image goes straight to the final steps. On volumes, ``consistency`` moves the decoded clean
estimates of all slices onto the data, coupled along z, before each DDIM update (the DDS form).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldir_pl import interrupt
from ldir_pl.errors import ConfigError
from ldir_pl.physics import LinearPhysics, image_seed
from ldir_pl.sampling.chunk_size import chunk_for_memory, cuda_peak_of, free_cuda_bytes
from ldir_pl.sampling.consistency import ZCoupledConsistency
from ldir_pl.sampling.guidance import Guidance
from ldir_pl.sampling.prior_loading import resolve_prior
from ldir_pl.sampling.refine import AnchoredTV
from ldir_pl.sampling.warm_start import WarmStart

PRECISIONS = ("fp32", "bf16")


@dataclass
class SampleOutput:
    """Decoded samples (averaged over ``num_samples``, not refined) and the misfit of every latent at every guided
    step, DDIM steps first, then the final steps."""

    images: Tensor
    losses: list[Tensor]


class GuidedDDIM:
    """Guided DDIM sampling with a diffusion prior; every part comes from the config.

    Args:
        prior: bundle folder or a loaded ``PriorBundle`` (latent or pixel).
        guidance: the misfit, its gradient and the history update (``Guidance``).
        init: ``None`` starts from pure noise at t = T (the LDIR paper), a ``WarmStart`` from an encoded
            classical image noised to the plan's first timestep.
        refine: ``AnchoredTV`` in pixel space at the end, or ``None`` (the decoded sample, clipped).
        consistency: ``ZCoupledConsistency``: at every guided step the decoded clean estimate is moved onto the
            data (coupled along z) and re-encoded before the DDIM update (the DDS form); None: off.
        num_steps, eta, timestep_spacing: DDIM steps run, stochasticity (0 deterministic), diffusers' spacing.
        clip_sample: clamp the predicted clean variable to [-c, c] (None: no clamp; pixel DPS clamps to 1).
        num_samples: samples per measurement, averaged before refinement; sample 0 uses the image's own seed.
        batch_size: at most this many latents through a network at once (measurements x samples; None: all;
            ``auto``: as many as free GPU memory holds, measured once per device, ``chunk_size.py``).
        seed: global seed; each image's noise comes from ``image_seed(seed, id)``.
        precision: ``fp32``, or ``bf16``: the UNet and the decoder under bf16 autocast (latents, the scheduler's
            arithmetic, the Adam state and the data term stay fp32).
        progress: tqdm bar over sampling steps.
        name: key under which results are reported.
    """

    def __init__(self, *, prior: Any, guidance: Guidance, init: WarmStart | None, refine: AnchoredTV | None,
                 num_steps: int, eta: float, timestep_spacing: str, clip_sample: float | None, num_samples: int,
                 batch_size: int | str | None, seed: int, progress: bool, name: str,
                 consistency: ZCoupledConsistency | None = None, precision: str = "fp32") -> None:
        if int(num_samples) < 1 or int(num_steps) < 0 or (int(num_steps) == 0 and init is None):
            raise ConfigError(f"sampler.num_samples={num_samples} must be >= 1 and num_steps={num_steps} >= 1 "
                              "(0 with a warm start: its encoded image, then the final steps, without the UNet)")
        if not 0.0 <= float(eta) <= 1.0:
            raise ConfigError(f"sampler.eta={eta}: expected a value in [0, 1]")
        self.name = str(name)
        # loaded on the CPU: the sampler follows its input's device (``to``), so each DDP rank moves it
        # to its own GPU once Lightning has placed the module, never at construction
        self.prior = resolve_prior(prior, "cpu")
        self.guidance, self.init, self.refine, self.consistency = guidance, init, refine, consistency
        if consistency is not None and int(num_samples) > 1:
            raise ConfigError("sampler.consistency couples the images of a batch (a volume's slices): it takes "
                              "num_samples=1")
        self.num_steps, self.eta = int(num_steps), float(eta)
        self.num_samples = int(num_samples)
        if batch_size not in (None, "auto") and not (str(batch_size).isdigit()):
            raise ConfigError(f"sampler.batch_size={batch_size!r}: expected a number of latents (0 or null: all at "
                              "once) or auto (as many as free GPU memory holds)")
        self.batch_size = batch_size if batch_size in (None, "auto") else int(batch_size) or None
        self._probed: dict[torch.device, tuple[int, int]] = {}  # device -> peak bytes of 1 and 2 latents
        self.seed, self.progress = int(seed), bool(progress)
        if precision not in PRECISIONS:
            raise ConfigError(f"sampler.precision={precision!r}: expected one of {PRECISIONS}")
        self.precision = precision
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(
            self.prior.scheduler.config, timestep_spacing=str(timestep_spacing), clip_sample=clip_sample is not None,
            clip_sample_range=1.0 if clip_sample is None else float(clip_sample))
        self.latent_shape = tuple(int(s) for s in self.prior.latent_shape)
        steps = self.num_steps if init is None else max(self.num_steps, round(self.num_steps / init.strength))
        if steps > int(self.scheduler.config.num_train_timesteps):
            raise ConfigError(f"sampler.num_steps={self.num_steps} needs a plan of {steps} DDIM steps"
                              + ("" if init is None else f" (init.strength={init.strength})")
                              + f", more than the prior's {self.scheduler.config.num_train_timesteps} timesteps")

    # ------------------------------------------------------------------ device and model pieces
    @property
    def device(self) -> torch.device:
        return self.prior.device

    def to(self, device: torch.device | str) -> GuidedDDIM:
        """Move the prior's networks to ``device`` (a no-op where they already are)."""
        if torch.device(device) != self.device:
            self.prior.to(device)
        return self

    def timesteps(self) -> Tensor:
        """The DDIM plan: ``num_steps`` steps from t = T, or with a warm start the last ``num_steps`` steps of
        a plan of ``num_steps / strength`` steps (diffusers' img2img slicing: it begins near strength * T)."""
        if self.num_steps == 0:
            return torch.zeros(0, dtype=torch.long)
        if self.init is None:
            self.scheduler.set_timesteps(self.num_steps)
            return self.scheduler.timesteps
        total = max(self.num_steps, round(self.num_steps / self.init.strength))
        self.scheduler.set_timesteps(total)
        return self.scheduler.timesteps[total - self.num_steps:]

    # ------------------------------------------------------------------ sampling
    def _validate(self, y: Tensor, physics: LinearPhysics, ids: Sequence) -> None:
        size = int(self.prior.image_size)
        if tuple(physics.image_shape) != (size, size):
            raise ConfigError(
                f"{self.name}: the prior was trained on {size}x{size} images, but the physics reconstructs "
                f"{physics.image_shape[0]}x{physics.image_shape[1]} images; set physics.image_size={size} or use "
                "a prior trained at the physics' size")
        physics.check(y, f"{self.name} input")
        if len(ids) != y.shape[0]:
            raise ConfigError(f"{self.name}: {len(ids)} image ids for a batch of {y.shape[0]} measurements")

    def reconstruct(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str]) -> Tensor:
        """Images (B,1,H,W) in [0, 1]: the guided samples, averaged, then refined."""
        out = self.sample(y, physics, ids)
        with torch.inference_mode(False):
            y = y.detach().clone().float().to(out.images.device)
            return self.refine(out.images, y, physics) if self.refine is not None else out.images.clamp(0, 1)

    def sample(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str]) -> SampleOutput:
        """The guided samples, averaged over ``num_samples`` and not refined (gradients are turned on here,
        so this runs inside Lightning's predict loop and under ``no_grad`` alike)."""
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
            with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                x, losses = self._sample(y_s, physics, ids_s, warm)
            return SampleOutput(x.view(len(ids), k, *x.shape[1:]).mean(dim=1), losses)

    @staticmethod
    def sample_id(image_id: int | str, k: int) -> int | str:
        """Noise identity of sample ``k`` of an image: the image's own id for the first sample."""
        return image_id if k == 0 else f"{image_id}#sample{k}"

    def initial_noise(self, ids: Sequence) -> tuple[Tensor, list[torch.Generator]]:
        gens = [torch.Generator().manual_seed(image_seed(self.seed, i)) for i in ids]
        z = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])
        return z.to(self.device), gens

    def _chunks(self, n: int) -> list[slice]:
        """Micro-batches of at most ``batch_size`` latents for every network call (memory is a chunk's)."""
        size = self._auto_chunk(n) if self.batch_size == "auto" else self.batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _auto_chunk(self, n: int) -> int:
        """The chunk free GPU memory holds; the probes run once per device, free memory is read every call."""
        device = self.device
        if device.type != "cuda":
            raise ConfigError(f"{self.name}: sampler.batch_size=auto sizes chunks by free GPU memory, and this runs "
                              f"on {device}; give a number (2 is the fastest per image on a 2-core CPU)")
        if n <= 1:
            return 1
        if device not in self._probed:
            peak_of = cuda_peak_of(self._probe_step, device)
            self._probed[device] = (peak_of(1), peak_of(2))
        return chunk_for_memory(*self._probed[device], free_cuda_bytes(device), n)

    def _probe_step(self, k: int) -> None:
        """The heaviest work of a guided step on ``k`` latents: UNet and decoder forward, backward through both."""
        plan = self.timesteps()
        t = (plan[:1] if len(plan) else torch.zeros(1, dtype=torch.long)).to(self.device)
        z = torch.randn(k, *self.latent_shape, device=self.device, requires_grad=True)
        eps = self.prior.unet(z, t).sample.float()
        x = self.prior.decode(z - eps).float()
        torch.autograd.grad(x.square().mean(), z)

    def _sample(self, y: Tensor, physics: LinearPhysics, ids: list, warm: Tensor | None) -> tuple[Tensor, list]:
        """One guided sample per measurement, decoded (not refined), and the misfit at every guided step. The
        networks run chunk by chunk inside every step; what couples the images (the consistency step, the
        history update) sees them all, so the result does not depend on the chunk size."""
        guide, decode = self.guidance, self.prior.decode
        updater = copy.deepcopy(guide.update)
        updater.reset()
        z, gens = self.initial_noise(ids)
        plan = self.timesteps()
        chunks = self._chunks(len(ids))
        if warm is not None:
            with torch.no_grad():  # the warm image, encoded and noised to the plan's first timestep (none: clean)
                encoded = torch.cat([self.prior.encode(warm[c]).float() for c in chunks])
                z = self.scheduler.add_noise(encoded, z, plan[:1]) if len(plan) else encoded
        losses = []
        n = len(plan)
        bar = tqdm(plan, desc=f"{self.name} ({len(ids)} images, {len(chunks)} chunks)", unit="step", leave=False,
                   disable=not self.progress)
        for i, t in enumerate(bar):
            interrupt.check()
            lr = guide.lr(i, n, float(self.scheduler.alphas_cumprod[t]))
            through_unet = lr != 0.0 and guide.wrt == "zt"
            noise = None
            if self.eta > 0:
                noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]).to(z)
            prev, z0s, grads, misfit = [], [], [], []
            for c in chunks:
                interrupt.check()
                with torch.set_grad_enabled(through_unet):
                    zt = z[c].detach().requires_grad_(through_unet)
                    out = self.prior.unet(zt, t.to(z.device)).sample.float()
                    step = self.scheduler.step(out, t, zt, eta=self.eta, use_clipped_model_output=True,
                                               variance_noise=None if noise is None else noise[c])
                prev.append(step.prev_sample.detach())
                if lr != 0.0:
                    z0 = step.pred_original_sample
                    wrt = zt if through_unet else z0.detach().requires_grad_(True)
                    g, loss = guide.gradient(y[c], physics, decode, z0 if through_unet else wrt, wrt)
                    grads.append(g)
                    misfit.append(loss)
                    z0s.append(z0.detach())
            z_next = torch.cat(prev)
            if lr != 0.0:
                if self.consistency is not None:
                    z_next = self._consistent_step(torch.cat(z0s), z, t, y, physics, noise, chunks)
                z_next = updater.update(z_next, torch.cat(grads), lr)
                losses.append(torch.cat(misfit))
            z = z_next.detach()
        z, final_losses = self._final_steps(z, y, physics, updater, chunks)
        with torch.no_grad():
            return torch.cat([decode(z[c]).float() for c in chunks]), losses + final_losses

    @torch.no_grad()
    def _consistent_step(self, z0: Tensor, zt: Tensor, t: Tensor, y: Tensor, physics: LinearPhysics,
                         noise: Tensor | None, chunks: list[slice]) -> Tensor:
        """The DDIM step taken from the data-consistent clean estimate E(C(D(z0))) instead of z0; C sees every
        image at once (a whole slab), the decoder and encoder a chunk at a time."""
        x0 = torch.cat([self.prior.decode(z0[c]).float() for c in chunks])
        x0c = self.consistency(x0, y, physics)
        z0c = torch.cat([self.prior.encode(x0c[c]).float() for c in chunks])
        a = float(self.scheduler.alphas_cumprod[t])
        eps = (zt - a**0.5 * z0c) / (1 - a) ** 0.5
        kind = self.scheduler.config.prediction_type
        out = eps if kind == "epsilon" else (a**0.5 * eps - (1 - a) ** 0.5 * z0c if kind == "v_prediction" else z0c)
        return self.scheduler.step(out, t, zt, eta=self.eta, variance_noise=noise).prev_sample

    def _final_steps(self, z: Tensor, y: Tensor, physics: LinearPhysics, updater,
                     chunks: list[slice]) -> tuple[Tensor, list]:
        """At t = 0 a DDIM step is the identity, so further iterations are history-update steps on the clean
        latent alone (decoder only), continuing the same updater state: they pull the sample onto the data
        while it stays in the decoder's range."""
        guide, losses = self.guidance, []
        for _ in tqdm(range(guide.final_steps), desc=f"{self.name} t=0", disable=not self.progress or not guide.final_steps,
                      leave=False):
            interrupt.check()
            parts = []
            for c in chunks:
                var = z[c].detach().requires_grad_(True)
                parts.append(guide.gradient(y[c], physics, self.prior.decode, var, var))
            z = updater.update(z.detach(), torch.cat([g for g, _ in parts]), guide.final_lr)
            losses.append(torch.cat([loss for _, loss in parts]))
        return z.detach(), losses


__all__ = ["GuidedDDIM", "SampleOutput"]
