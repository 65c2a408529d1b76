"""The prior as one object: networks, noise schedule, scaling factor and intensity transform, saved as a
diffusers folder that diffusers' own pipelines load.

Layout (``save_pretrained``)::

    prior/
      model_index.json  LDMPipeline (latent priors) or DDPMPipeline (pixel priors): diffusers alone loads it
      vqvae/            AutoencoderKL (latent priors; the folder name is LDMPipeline's component name)
      unet/             UNet2DModel (EMA weights)
      scheduler/        DDPMScheduler (clip_sample=False for latents)
      ldir_prior.json   kind, image size, intensity transform, scaling factor, latent shape, training config

Weights are safetensors only: a folder holding pickled ``.bin`` weights is refused with the file named.
Bundles written before ``model_index.json`` existed keep their VAE in ``vae/`` and still load.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from torch import Tensor

from ldir_pl.atomic import atomic_dir
from ldir_pl.errors import ConfigError, MissingPathError
from ldir_pl.models.intensity import IntensityTransform

METADATA_FILE = "ldir_prior.json"
FORMAT_VERSION = 2
WEIGHTS = "diffusion_pytorch_model.safetensors"
Kind = Literal["latent", "pixel"]


@dataclass
class PriorBundle:
    """A loaded prior. Images are in [0, 1]; for latent priors ``encode`` gives
    ``z = scaling_factor * E(T(x))`` (posterior mean) and ``decode`` gives ``T^-1(D(z / scaling_factor))``."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None
    scaling_factor: float
    image_size: int
    latent_shape: tuple[int, ...]
    kind: Kind
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_parts(cls, vae: AutoencoderKL | None, unet: UNet2DModel, scheduler: DDPMScheduler,
                   metadata: dict[str, Any]) -> PriorBundle:
        """A bundle from trained networks; ``metadata`` needs ``image_size``, kind and latent shape follow."""
        if "image_size" not in metadata:
            raise ConfigError("prior metadata must contain 'image_size'")
        size = int(metadata["image_size"])
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            latent_shape = (int(vae.config.latent_channels), size // factor, size // factor)
            scaling = float(metadata.get("scaling_factor", vae.config.scaling_factor))
            vae.register_to_config(scaling_factor=scaling)  # what LDMPipeline divides by
        else:
            latent_shape, scaling = (int(unet.config.in_channels), size, size), 1.0
        meta = {**_jsonable(metadata), "image_size": size, "scaling_factor": scaling}
        meta.setdefault("intensity_transform", IntensityTransform().as_dict())
        return cls(unet, scheduler, vae, scaling, size, latent_shape, "latent" if vae is not None else "pixel", meta)

    # ------------------------------------------------------------------ use
    @property
    def transform(self) -> IntensityTransform:
        return IntensityTransform.from_metadata(self.metadata)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> PriorBundle:
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Images in [0, 1] -> the diffusion variable (scaled latent posterior mean, or network pixels)."""
        u = self.transform.to_model(x)
        if self.vae is None:
            return u
        return self.vae.encode(u).latent_dist.mean * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """The diffusion variable -> images in [0, 1] space (not clamped, so gradients pass)."""
        out = z if self.vae is None else self.vae.decode(z / self.scaling_factor).sample
        return self.transform.from_model(out)

    # ------------------------------------------------------------------ disk
    def save_pretrained(self, path: str | Path, half: bool = False) -> Path:
        """Write the bundle (whole or not at all: into a temporary folder renamed when complete); ``half`` stores
        the weights in fp16 (half the size; ``from_pretrained`` loads fp32)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self._write(tmp, half)
        return path

    def _write(self, path: Path, half: bool) -> None:
        if half:
            unet, vae = copy.deepcopy(self.unet).half(), None if self.vae is None else copy.deepcopy(self.vae).half()
            return replace(self, unet=unet, vae=vae)._write(path, half=False)
        index = {"_class_name": "LDMPipeline" if self.kind == "latent" else "DDPMPipeline",
                 "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", type(self.scheduler).__name__]}
        if self.vae is not None:
            self.vae.save_pretrained(path / "vqvae", safe_serialization=True)
            index["vqvae"] = ["diffusers", "AutoencoderKL"]
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        meta = {**self.metadata, "format_version": FORMAT_VERSION, "kind": self.kind, "image_size": self.image_size,
                "latent_shape": list(self.latent_shape), "scaling_factor": self.scaling_factor}
        (path / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return None

    @classmethod
    def from_pretrained(cls, path: str | Path, kind: Kind | None = None) -> PriorBundle:
        """Load a bundle (networks in eval mode on the CPU); every error names the path or file at fault."""
        path = Path(path)
        if not path.exists():
            raise MissingPathError(f"prior bundle not found: {path}")
        if not path.is_dir():
            raise ConfigError(f"prior bundle must be a folder, got the file {path}")
        meta_file = path / METADATA_FILE
        if not meta_file.exists():
            raise ConfigError(f"{path} is not an ldir prior bundle: {METADATA_FILE} is missing")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{meta_file} is not valid JSON: {err}") from err
        found = meta.get("kind")
        if found not in ("latent", "pixel"):
            raise ConfigError(f"{meta_file}: unknown prior kind {found!r}")
        if kind is not None and found != kind:
            raise ConfigError(f"{path} holds a {found!r} prior, but a {kind!r} prior was requested")
        vae_dir = path / "vqvae" if (path / "vqvae").is_dir() else path / "vae"
        need = [path / "unet", path / "scheduler"] + ([vae_dir] if found == "latent" else [])
        missing = [d.name for d in need if not d.is_dir()]
        if missing:
            raise ConfigError(f"{path} is an incomplete {found} prior bundle: missing {', '.join(missing)}/")
        for d in need[:1] + need[2:]:
            _require_safetensors(d)
        unet = _load_part(UNet2DModel, path / "unet")
        scheduler = _load_part(DDPMScheduler, path / "scheduler")
        vae = _load_part(AutoencoderKL, vae_dir) if found == "latent" else None  # fp16 weights run in fp32
        return cls(unet, scheduler, vae, float(meta.get("scaling_factor", 1.0)), int(meta["image_size"]),
                   tuple(int(v) for v in meta["latent_shape"]), found, meta)


def _load_part(cls, folder: Path):
    """One diffusers part of a bundle; a truncated or foreign weights file is an error naming it."""
    try:
        if cls is DDPMScheduler:
            return cls.from_pretrained(folder)
        return cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).float().eval()
    except Exception as err:  # noqa: BLE001 - safetensors, json and diffusers raise many types; re-raised naming the file
        what = folder / (WEIGHTS if cls is not DDPMScheduler else "scheduler_config.json")
        raise ConfigError(f"{what}: cannot be loaded as a {cls.__name__} ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]})") from err


def _require_safetensors(folder: Path) -> None:
    if (folder / WEIGHTS).is_file():
        return
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickled:
        raise ConfigError(f"{folder / pickled[0]}: pickled weights; priors load from {WEIGHTS} only "
                         "(re-save the model with save_pretrained(..., safe_serialization=True))")
    raise ConfigError(f"{folder}: no {WEIGHTS}")


def save_prior(path: str | Path, vae: AutoencoderKL | None, unet: UNet2DModel, scheduler: DDPMScheduler,
               metadata: dict[str, Any]) -> Path:
    """``PriorBundle.from_parts(...).save_pretrained(path)``: what training exports."""
    return PriorBundle.from_parts(vae, unet, scheduler, metadata).save_pretrained(path)


def load_prior(path: str | Path, device: str | torch.device = "cpu", kind: Kind | None = None) -> PriorBundle:
    """``PriorBundle.from_pretrained(path, kind)`` on ``device``."""
    return PriorBundle.from_pretrained(path, kind).to(device)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (OmegaConf containers, tuples, paths, tensors converted)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN (e.g. a metric never computed) is not valid JSON
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
