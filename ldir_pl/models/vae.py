"""Stage 1 of the prior: a 1-channel CT autoencoder (``diffusers.AutoencoderKL``) in Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torchmetrics.functional import structural_similarity_index_measure

from ldir_pl.atomic import atomic_dir
from ldir_pl.errors import ConfigError, MissingPathError
from ldir_pl.metrics import psnr, ssim

from .images import log_image_grid
from .init_from import bundle_part, load_bundle_weights
from .intensity import DEFAULT as INTENSITY
from .training import CKPT_KIND_KEY, PriorTrainingModule


def to_model(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> what the networks see (the training transform, stored in every bundle)."""
    return INTENSITY.to_model(x)


def from_model(y: torch.Tensor) -> torch.Tensor:
    """Network output -> images, clamped to [0, 1] for losses and metrics on images."""
    return INTENSITY.from_model(y).clamp(0.0, 1.0)


def build_autoencoder(image_size: int, block_out_channels: list[int], latent_channels: int, layers_per_block: int,
                      norm_num_groups: int, mid_block_add_attention: bool) -> AutoencoderKL:
    """AutoencoderKL for 1-channel images; each level after the first halves the size (``len - 1`` times)."""
    chans = [int(c) for c in block_out_channels]
    factor = 2 ** (len(chans) - 1)
    if image_size % factor:
        raise ConfigError(f"model.vae.autoencoder.block_out_channels={chans} downsample by {factor}, which does not "
                          f"divide image_size={image_size}")
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=["DownEncoderBlock2D"] * len(chans),
        up_block_types=["UpDecoderBlock2D"] * len(chans),
        block_out_channels=chans,
        layers_per_block=int(layers_per_block),
        latent_channels=int(latent_channels),
        norm_num_groups=int(norm_num_groups),
        sample_size=int(image_size),
        scaling_factor=1.0,  # set from data by the latent stage
        mid_block_add_attention=bool(mid_block_add_attention),
    )


class VAEModule(PriorTrainingModule):
    """Trains the autoencoder: L1 + ``kl_weight`` * KL (+ ``ssim_weight`` * (1 - SSIM)).

    ``kl_weight`` multiplies the per-image summed KL relative to the per-image *summed* L1, as in the
    LDM autoencoders (so 1e-6 means the same as there even though the L1 is logged as a mean).
    """

    kind = "vae"

    def __init__(self, *, image_size: int, autoencoder: dict, lr: float, weight_decay: float, warmup_steps: int,
                 min_lr_ratio: float, kl_weight: float, ssim_weight: float, num_val_images: int,
                 train_crop: int | None, init_from: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = build_autoencoder(image_size, **autoencoder)
        if init_from:  # training that continues: the bundle's VAE (architecture checked) is the start
            load_bundle_weights(self.vae, init_from, "vae")
        self._val_images: list[torch.Tensor] = []

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False):
        """Images in [0,1] -> (reconstruction in [0,1] model space [-1,1], posterior)."""
        posterior = self.vae.encode(to_model(x)).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.vae.decode(z).sample, posterior

    def _losses(self, x: torch.Tensor, sample_posterior: bool) -> dict[str, torch.Tensor]:
        rec, posterior = self(x, sample_posterior)
        target = to_model(x)
        l1 = (rec - target).abs().mean()
        kl = posterior.kl().mean() / target[0].numel()
        loss = l1 + self.hparams.kl_weight * kl
        out = {"l1": l1, "kl": kl, "rec": rec}
        if self.hparams.ssim_weight > 0:
            s = structural_similarity_index_measure(from_model(rec), x, data_range=1.0)
            loss = loss + self.hparams.ssim_weight * (1.0 - s)
            out["ssim"] = s
        out["loss"] = loss
        return out

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Random square crop (the autoencoder is convolutional): ~(H/crop)^2 cheaper steps on CPU."""
        c = self.hparams.train_crop
        if not c or c >= x.shape[-1]:
            return x
        if c % self.downsample_factor:
            raise ConfigError(f"model.vae.train_crop={c} must be a multiple of downsample_factor={self.downsample_factor}")
        i, j = (int(v) for v in torch.randint(0, x.shape[-1] - c + 1, (2,)))
        return x[..., i : i + c, j : j + c]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self._losses(self._random_crop(batch), sample_posterior=True)
        self.log_dict({f"train/{k}": out[k] for k in ("loss", "l1", "kl")}, prog_bar=False)
        self.log("train/loss_step", out["loss"], prog_bar=True, logger=False)
        return out["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = self._losses(batch, sample_posterior=False)
        rec = from_model(out["rec"])
        self.log("val/loss", out["loss"], sync_dist=True)
        self.log("val/psnr", psnr(rec, batch).mean(), sync_dist=True, prog_bar=True)
        self.log("val/ssim", ssim(rec, batch).mean(), sync_dist=True)
        if batch_idx == 0:  # inputs over reconstructions, first validation batch
            n = self.hparams.num_val_images
            self._val_images = [batch[:n].detach().cpu(), rec[:n].detach().cpu()]

    def on_validation_epoch_end(self) -> None:
        if self._val_images:
            log_image_grid(self, "val/reconstructions", torch.cat(self._val_images), nrow=len(self._val_images[0]))
        self._val_images = []

    def trained_parameters(self):
        return self.vae.parameters()

    def export(self, path: str | Path) -> Path:
        """Write the autoencoder as a diffusers folder (what the latent stage loads)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.vae.save_pretrained(tmp)
        return path


def _ckpt_kind(ckpt: dict) -> str | None:
    return ckpt.get(CKPT_KIND_KEY) if isinstance(ckpt, dict) else None


def load_vae(path: str | Path, map_location: str | torch.device = "cpu") -> AutoencoderKL:
    """Load the stage-1 autoencoder from a diffusers ``vae`` folder, a prior bundle, or a VAE ``.ckpt``.

    Anything else (missing path, a latent-diffusion checkpoint, a folder of another model) raises a
    ``ValueError``/``FileNotFoundError`` naming the path, so the latent stage fails before training.
    """
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"VAE not found: {path} (run the 'vae' stage first or set model.ldm.vae_path)")
    if path.is_dir():
        if (path / "ldir_prior.json").exists():
            try:
                path = bundle_part(path, "vae")
            except ConfigError as err:
                raise ConfigError(f"{path} is a prior bundle without a VAE (a pixel-space prior?), not a VAE") from err
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ConfigError(f"{path} is not a diffusers AutoencoderKL folder (no config.json)")
        cls = json.loads(cfg_file.read_text()).get("_class_name")
        if cls != "AutoencoderKL":
            raise ConfigError(f"{path} holds a diffusers {cls!r}, expected 'AutoencoderKL'")
        return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).to(map_location)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ConfigError(f"cannot read {path} as a torch checkpoint: {err}") from err
    kind = _ckpt_kind(ckpt)
    if kind != VAEModule.kind:
        raise ConfigError(
            f"{path} is not a VAE checkpoint: it was written by a {kind or 'non-ldir'} module "
            f"(expected {VAEModule.kind!r}); pass the stage-1 output (OUT/vae/model or OUT/vae/checkpoints/*.ckpt)"
        )
    hp = ckpt["hyper_parameters"]
    vae = build_autoencoder(hp["image_size"], **hp["autoencoder"])
    state = {k[len("vae."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    vae.load_state_dict(state)
    return vae.to(map_location)
