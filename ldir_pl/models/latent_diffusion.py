"""Stage 2 of the prior: a ``diffusers.UNet2DModel`` trained with DDPM on latents of the frozen VAE.

``DiffusionModule`` holds everything shared with the pixel-space baseline (noise schedule, EMA,
optimiser, sampling for validation); subclasses only say how images map to the diffused space.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel

from ldir_pl import interrupt
from ldir_pl.errors import ConfigError

from .ema import EMA
from .images import log_image_grid
from .init_from import load_bundle_weights, stage_minutes
from .latent_norm import channel_moments, fold_channel_normalization
from .prior_quality import ddim_samples, denoising_loss, sample_statistics
from .schedules import make_ddpm_scheduler
from .training import PriorTrainingModule
from .vae import from_model, load_vae, to_model


def build_unet(sample_size: int, channels: int, block_out_channels: list[int], layers_per_block: int,
               attention_levels: list[int], **kwargs: Any) -> UNet2DModel:
    """UNet2DModel with self-attention at ``attention_levels`` (0 = full resolution); ``kwargs`` go to diffusers
    (``attention_head_dim``, ``norm_num_groups``, ``dropout``)."""
    n = len(block_out_channels)
    attn = set(attention_levels)
    down_block_types = ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)]
    up_block_types = ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))]
    if sample_size % 2 ** (n - 1):
        raise ConfigError(f"UNet input size {sample_size} is not divisible by 2**{n - 1} ({n} levels)")
    return UNet2DModel(
        sample_size=int(sample_size),
        in_channels=int(channels),
        out_channels=int(channels),
        block_out_channels=[int(c) for c in block_out_channels],
        layers_per_block=int(layers_per_block),
        down_block_types=list(down_block_types),
        up_block_types=list(up_block_types),
        **kwargs,
    )


def min_snr_weights(scheduler, t: torch.Tensor, prediction_type: str, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): the easy, low-noise timesteps stop dominating the
    gradient, which speeds convergence severalfold; ``gamma=None`` weighs every timestep alike."""
    if gamma is None:
        return torch.ones(t.shape, device=t.device)
    a = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = a / (1.0 - a)
    clipped = snr.clamp(max=float(gamma))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


class DiffusionModule(PriorTrainingModule):
    """DDPM training of a UNet with EMA, AdamW + warmup/cosine; validation samples with DDIM."""

    kind = "diffusion"

    def __init__(self, *, unet: dict, scheduler: dict, lr: float, weight_decay: float, warmup_steps: int,
                 min_lr_ratio: float, ema_decay: float, num_val_samples: int, val_inference_steps: int,
                 sample_seed: int, snr_gamma: float | None) -> None:
        super().__init__()
        self.unet_kwargs = dict(unet)
        self.noise_scheduler = make_ddpm_scheduler(**scheduler)
        self.unet: UNet2DModel  # built by the subclass once the diffused shape is known
        self.ema: EMA
        self.minutes_before = 0.0  # training minutes of the weights this run starts from (init_from)
        self._val_real: list[torch.Tensor] = []

    # --- subclass interface -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] -> tensors to diffuse."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffused tensors -> images in [0,1]."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------------
    def _init_networks(self, channels: int, size: int) -> None:
        self.unet = build_unet(size, channels, **self.unet_kwargs)
        self.ema = EMA(self.unet, self.hparams.ema_decay)

    def diffusion_loss(self, z0: torch.Tensor, unet: UNet2DModel, generator=None) -> torch.Tensor:
        sched = self.noise_scheduler
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
        noisy = sched.add_noise(z0, noise, t)
        pred = unet(noisy, t).sample
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(z0, noise, t)
        else:
            target = z0
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (min_snr_weights(sched, t, kind, self.hparams.snr_gamma) * per_sample).mean()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            z0 = self.encode(batch)
        loss = self.diffusion_loss(z0, self.unet)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update(self.unet)

    def clean_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the diffused variable without posterior sampling (the fixed held-out figure's input)."""
        return self.encode(x)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # Fixed noise per batch so val/loss is comparable across epochs (and sweep trials).
        g = torch.Generator(device=batch.device).manual_seed(self.hparams.sample_seed + batch_idx)
        z0 = self.encode(batch)
        self.log("val/loss", self.diffusion_loss(z0, self.ema.module, generator=g), sync_dist=True, prog_bar=True)
        grid = denoising_loss(self.ema.module, self.noise_scheduler, self.clean_latents(batch),
                              seed=self.hparams.sample_seed + batch_idx)
        self.log("val/eps_mse_grid", sum(grid.values()) / len(grid), sync_dist=True, batch_size=len(batch))
        if sum(len(b) for b in self._val_real) < 64:  # real slices the samples are compared with
            self._val_real.append(batch.detach().cpu())

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        real, self._val_real = self._val_real, []
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or self.hparams.num_val_samples <= 0:
            return
        samples = self.sample(self.hparams.num_val_samples, self.hparams.val_inference_steps, self.hparams.sample_seed)
        minutes = self.minutes_before + (time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())) / 60
        self.log("val/train_minutes", minutes, rank_zero_only=True)
        self.log("val/sample_mean", samples.mean(), rank_zero_only=True)
        if real:
            stats = sample_statistics(samples, torch.cat(real))
            self.log_dict({f"val/{k}": v for k, v in stats.items()}, rank_zero_only=True)
        log_image_grid(self, "val/samples", samples)

    @torch.no_grad()
    def sample(self, n: int, num_inference_steps: int = 50, seed: int = 0) -> torch.Tensor:
        """Unconditional samples from the EMA network as ``ldir-sample`` draws them, decoded to images in [0,1]."""
        return ddim_samples(self.ema.module, self.noise_scheduler.config, self.decode, self.sample_shape, n,
                            num_inference_steps, seed)

    def trained_parameters(self):
        return self.unet.parameters()

    def export_unet(self) -> UNet2DModel:
        """The EMA network (what gets exported and sampled)."""
        return self.ema.module


LATENT_NORMS = ("global", "channel")


class LatentDiffusionModule(DiffusionModule):
    """DDPM on ``scaling_factor * VAE.encode(x)``.

    Unit-variance latents suit the fixed DDPM noise schedule. ``latent_norm: global`` estimates
    ``scaling_factor`` at the start of training as 1/std of the training latents (unless given);
    ``channel`` standardises every latent channel instead, folded into the VAE's quant convolutions
    (``latent_norm.py``), and leaves a scaling factor of 1. The factor is a buffer (checkpointed, restored on
    resume) and is written into the exported VAE's config.
    """

    kind = "latent"

    def __init__(self, *, vae_path: str, image_size: int, scaling_factor: float | None, latent_norm: str,
                 scale_estimation_batches: int, sample_posterior: bool, cache_latents: bool,
                 init_from: str | None = None, **diffusion: Any) -> None:
        super().__init__(**diffusion)
        self.save_hyperparameters()
        if latent_norm not in LATENT_NORMS:
            raise ConfigError(f"model.ldm.latent_norm={latent_norm!r}: expected one of {LATENT_NORMS}")
        self.vae: AutoencoderKL = load_vae(vae_path).eval().requires_grad_(False)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if image_size % factor:
            raise ConfigError(f"image_size={image_size} not divisible by the VAE's downsampling {factor}")
        self.latent_size = image_size // factor
        self.register_buffer("scaling_factor", torch.tensor(float(scaling_factor or 0.0)))
        self._init_networks(self.vae.config.latent_channels, self.latent_size)
        if init_from:
            self._continue_from(str(init_from), vae_path)
        self._cache: torch.Tensor | None = None  # (N, 2C, h, w) posterior mean and std of every training image
        self._order: torch.Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.vae.config.latent_channels, self.latent_size, self.latent_size)

    def _continue_from(self, bundle: str, vae_path: str) -> None:
        """Start the UNet and its EMA copy from a bundle's (EMA) UNet. On the bundle's own VAE its latent scaling
        is kept, so the UNet sees the latents it was trained on; on another VAE the scaling is estimated anew."""
        meta = load_bundle_weights(self.unet, bundle, "unet")
        self.ema.module.load_state_dict(self.unet.state_dict())
        self.ema.warmup = False  # the average starts from trained weights, not from a random initialisation
        self.minutes_before = stage_minutes(meta, "ldm")
        same_vae = Path(vae_path).resolve() == Path(bundle).resolve()
        if same_vae and self.hparams.scaling_factor is None:
            self.scaling_factor.fill_(float(meta.get("scaling_factor", 1.0)))

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    def _raw_latents(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(to_model(x)).latent_dist
        return dist.sample() if self.hparams.sample_posterior else dist.mode()

    # --- latent cache: the frozen encoder costs more than a UNet step, so encode each image once ---
    @torch.no_grad()
    def build_latent_cache(self, images: list[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
        """Posterior mean and std of each (1,H,W) training image, concatenated on channels."""
        out = []
        for i in range(0, len(images), batch_size):
            interrupt.check()
            x = torch.stack(images[i:i + batch_size]).to(self.device)
            dist = self.vae.encode(to_model(x)).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).cpu())
        return torch.cat(out)

    def _cached_latents(self, n: int) -> torch.Tensor:
        """The next ``n`` cached latents of this epoch's permutation (a new one when it runs out)."""
        if self._order is None or len(self._order) < n:
            self._order = torch.randperm(len(self._cache), generator=self._perm_gen)
        idx, self._order = self._order[:n], self._order[n:]
        mean, std = self._cache[idx].to(self.device).chunk(2, dim=1)
        z = mean + std * torch.randn_like(std) if self.hparams.sample_posterior else mean
        return z * self.scaling_factor

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self._cache is None:
            return super().training_step(batch, batch_idx)
        # the loader paces the epoch; the latents of as many training images come from the cache
        loss = self.diffusion_loss(self._cached_latents(batch.shape[0]), self.unet)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._raw_latents(x) * self.scaling_factor

    def clean_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(to_model(x)).latent_dist.mode() * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return from_model(self.vae.decode(z / self.scaling_factor).sample)

    @torch.no_grad()
    def estimate_scaling_factor(self, loader) -> float:
        """1 / std of the latents of up to ``scale_estimation_batches`` batches (all ranks pooled)."""
        s = torch.zeros(3, dtype=torch.float64, device=self.device)  # count, sum, sum of squares
        for i, batch in enumerate(loader):
            if i >= self.hparams.scale_estimation_batches:
                break
            z = self._raw_latents(batch.to(self.device)).double()
            s += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=self.device), z.sum(), (z**2).sum()])
        if self.trainer is not None and self.trainer.world_size > 1:
            s = self.trainer.strategy.reduce(s, reduce_op="sum")
        if s[0] == 0:
            raise ConfigError("cannot estimate the latent scaling factor: the training dataloader is empty")
        var = s[2] / s[0] - (s[1] / s[0]) ** 2
        return float(1.0 / var.clamp_min(1e-12).sqrt())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.cache_latents:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "items"):
                raise ConfigError("model.ldm.cache_latents=true needs a slice data module (data=dicom|nifti|ct_mix|"
                                 "folder|...) that lists its training images")
            if getattr(dm, "augment", False):
                raise ConfigError("model.ldm.cache_latents=true caches un-augmented latents: set data.augment=false "
                                 "for the ldm stage (stages.ldm.data.augment=false)")
            self._cache = self.build_latent_cache([load() for _, load in dm.items("train")])
            # each rank walks its own permutation of the cache
            self._perm_gen = torch.Generator().manual_seed(torch.initial_seed() + 7919 * self.global_rank)
            self.print(f"cached the latents of {len(self._cache)} training images")
        if float(self.scaling_factor) > 0:  # given, or restored from a checkpoint (with a folded VAE)
            return
        if self.hparams.latent_norm == "channel":
            self._standardize_channels()
            return
        if self._cache is not None:  # every training latent is at hand, the same on every rank
            mean, std = (t.double() for t in self._cache.chunk(2, dim=1))
            # variance of a posterior sample: of the means, plus the mean posterior variance
            var = mean.var() + (std.pow(2).mean() if self.hparams.sample_posterior else 0.0)
            sf = float(1.0 / var.clamp_min(1e-24).sqrt())
        else:
            dm = self.trainer.datamodule
            loader = dm.train_dataloader() if dm is not None else self.trainer.fit_loop._data_source.dataloader()
            sf = self.estimate_scaling_factor(loader)
        self.scaling_factor.fill_(sf)
        self.print(f"latent scaling factor estimated from training data: {sf:.5f}")

    def _standardize_channels(self) -> None:
        """Fold per-channel standardisation into the VAE (and the cache) from the training latents."""
        if self._cache is None:
            raise ConfigError("model.ldm.latent_norm=channel needs model.ldm.cache_latents=true (the per-channel "
                             "moments come from every training latent)")
        mean, std = self._cache.chunk(2, dim=1)
        shift, scale = channel_moments(mean, std if self.hparams.sample_posterior else None)
        fold_channel_normalization(self.vae, shift.to(self.device), scale.to(self.device))
        c = len(shift)
        self._cache = torch.cat([(mean - shift.view(1, c, 1, 1)) / scale.view(1, c, 1, 1),
                                 std / scale.view(1, c, 1, 1)], dim=1)
        self.scaling_factor.fill_(1.0)
        self.print("latent channels standardised (folded into the VAE): spreads "
                   + ", ".join(f"{v:.3f}" for v in scale.tolist()))

    def export_vae(self) -> AutoencoderKL:
        """The frozen VAE with the estimated scaling factor written into its diffusers config."""
        self.vae.register_to_config(scaling_factor=float(self.scaling_factor))
        return self.vae
