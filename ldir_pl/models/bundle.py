"""The exported prior: one diffusers-format folder that reconstruction (or diffusers alone) loads.

Layout::

    prior/
      vae/          AutoencoderKL.save_pretrained   (latent priors only)
      unet/         UNet2DModel.save_pretrained      (EMA weights)
      scheduler/    DDPMScheduler.save_pretrained    (clip_sample=False for latents)
      ldir_prior.json  kind, image size, intensity transform, scaling factor, latent shape, training config
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

METADATA_FILE = "ldir_prior.json"
FORMAT_VERSION = 1
Kind = Literal["latent", "pixel"]


@dataclass
class PriorBundle:
    """A loaded prior. Build a sampler with ``DDIMScheduler.from_config(bundle.scheduler.config)``.

    Images are in [0, 1]; networks see ``metadata['intensity_transform']`` (2x - 1). For latent priors
    ``z = scaling_factor * vae.encode(2x - 1).latent_dist.mean`` and ``x = (vae.decode(z / scaling_factor) + 1) / 2``.
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None
    scaling_factor: float
    image_size: int
    latent_shape: tuple[int, ...]
    kind: Kind
    metadata: dict[str, Any] = field(default_factory=dict)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (OmegaConf containers, tuples, paths, tensors converted)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
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


def save_prior(
    path: str | Path,
    vae: AutoencoderKL | None,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    metadata: dict[str, Any],
) -> Path:
    """Write a bundle. ``metadata`` needs ``image_size``; ``kind``/``latent_shape`` are inferred."""
    path = Path(path)
    if "image_size" not in metadata:
        raise ValueError("save_prior: metadata must contain 'image_size'")
    path.mkdir(parents=True, exist_ok=True)
    kind: Kind = "latent" if vae is not None else "pixel"
    size = int(metadata["image_size"])
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent_shape = (int(vae.config.latent_channels), size // factor, size // factor)
        scaling = float(metadata.get("scaling_factor", vae.config.scaling_factor))
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(path / "vae")
    else:
        latent_shape = (int(unet.config.in_channels), size, size)
        scaling = 1.0
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    meta = {
        **_jsonable(metadata),
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "image_size": size,
        "latent_shape": list(latent_shape),
        "scaling_factor": scaling,
    }
    meta.setdefault("intensity_transform", {"type": "affine", "scale": 2.0, "shift": -1.0, "data_range": [0.0, 1.0]})
    (path / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_prior(path: str | Path, device: str | torch.device = "cpu", kind: Kind | None = None) -> PriorBundle:
    """Load a bundle written by :func:`save_prior` (networks in eval mode on ``device``).

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for a folder that is not a
    bundle or (when ``kind`` is given) a bundle of the other kind; every message names the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prior bundle not found: {path}")
    if not path.is_dir():
        raise ValueError(f"prior bundle must be a folder, got the file {path}")
    meta_file = path / METADATA_FILE
    if not meta_file.exists():
        raise ValueError(f"{path} is not an ldir prior bundle: {METADATA_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is not valid JSON: {err}") from err
    found = meta.get("kind")
    if found not in ("latent", "pixel"):
        raise ValueError(f"{meta_file}: unknown prior kind {found!r}")
    if kind is not None and found != kind:
        raise ValueError(f"{path} holds a {found!r} prior, but a {kind!r} prior was requested")
    need = ["unet", "scheduler"] + (["vae"] if found == "latent" else [])
    missing = [d for d in need if not (path / d).is_dir()]
    if missing:
        raise ValueError(f"{path} is an incomplete {found} prior bundle: missing {', '.join(missing)}/")
    unet = UNet2DModel.from_pretrained(path / "unet", low_cpu_mem_usage=False).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    vae = AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False).to(device).eval() if found == "latent" else None
    return PriorBundle(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        scaling_factor=float(meta.get("scaling_factor", 1.0)),
        image_size=int(meta["image_size"]),
        latent_shape=tuple(int(v) for v in meta["latent_shape"]),
        kind=found,
        metadata=meta,
    )
