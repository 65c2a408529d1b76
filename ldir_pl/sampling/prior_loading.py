"""Resolve a sampler's ``prior`` argument (bundle folder or a loaded ``PriorBundle``) with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldir_pl.errors import ConfigError, MissingPathError


def resolve_prior(prior: Any, device: torch.device | str = "cpu", kind: str | None = None):
    """A ``PriorBundle`` on ``device``; paths are loaded with ``ldir_pl.models.bundle.load_prior``."""
    if prior is None:
        raise ConfigError("sampler.prior is not set: give the prior bundle folder (prior.path=...)")
    if isinstance(prior, (str, Path)):
        path = Path(str(prior)).expanduser()
        if not path.exists():
            raise MissingPathError(f"prior bundle not found: {path} (set prior.path / prior.pixel_path to the "
                                    "folder written by training, the one holding ldir_prior.json)")
        from ldir_pl.models.bundle import load_prior  # lazy: keeps the sampling package import light

        bundle = load_prior(path, device=device)
    else:
        bundle = prior
    for attr in ("unet", "scheduler", "kind", "image_size"):
        if not hasattr(bundle, attr):
            raise ConfigError(f"sampler.prior: expected a bundle path or a PriorBundle, got {type(prior).__name__}")
    if kind is not None and bundle.kind != kind:
        raise ConfigError(f"this sampler needs a {kind!r} prior, but the bundle holds a {bundle.kind!r} prior")
    if bundle.kind == "latent" and bundle.vae is None:
        raise ConfigError("latent prior bundle has no VAE")
    bundle.to(device)
    bundle.unet.eval().requires_grad_(False)
    if bundle.vae is not None:
        bundle.vae.eval().requires_grad_(False)
    return bundle


__all__ = ["resolve_prior"]
