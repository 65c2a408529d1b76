"""Start a training stage from a prior bundle's weights, so that training adds up across runs and machines.

``ldir-train init_from=BUNDLE`` (the CT presets default to the packaged prior) copies the bundle's VAE into the
VAE stage and its UNet (the exported EMA weights) into the latent stage, into both the trained network and its
EMA copy. The architecture is the configured one and must be the bundle's: a mismatch is one error naming the
settings that differ, never a silently partial load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ldir_pl.errors import ConfigError, MissingPathError

#: the diffusers config keys that decide a network's weight shapes
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                     "down_block_types", "up_block_types", "attention_head_dim", "norm_num_groups",
                     "mid_block_add_attention")


def bundle_part(bundle: str | Path, part: str) -> Path:
    """The folder of ``part`` ("unet" or "vae") inside a prior bundle; errors name the bundle."""
    root = Path(bundle)
    if not root.is_dir():
        raise MissingPathError(f"init_from={root}: no such prior bundle folder")
    if not (root / "ldir_prior.json").is_file():
        raise ConfigError(f"init_from={root} is not a prior bundle (no ldir_prior.json)")
    names = ("vqvae", "vae") if part == "vae" else (part,)
    for name in names:
        if (root / name / "config.json").is_file():
            return root / name
    raise ConfigError(f"init_from={root} holds no {part} (a pixel-space prior has no VAE)")


def _architecture(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(config).items()
            if k in ARCHITECTURE_KEYS}


def load_bundle_weights(target: nn.Module, bundle: str | Path, part: str) -> dict[str, Any]:
    """Load the bundle's ``part`` weights into ``target`` (a diffusers model of the same architecture) in place;
    returns the bundle's ``ldir_prior.json`` metadata."""
    from diffusers import AutoencoderKL, UNet2DModel

    folder = bundle_part(bundle, part)
    cls = AutoencoderKL if part == "vae" else UNet2DModel
    source = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).float()
    want, have = _architecture(target.config), _architecture(source.config)
    differ = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
    if differ:
        what = "; ".join(f"{k}: configured {a}, bundle {b}" for k, (a, b) in sorted(differ.items()))
        raise ConfigError(f"init_from={bundle}: its {part} has another architecture ({what}); configure the bundle's "
                          "architecture or set init_from=null to train from scratch")
    target.load_state_dict(source.state_dict())
    return json.loads((Path(bundle) / "ldir_prior.json").read_text())


def stage_minutes(meta: dict[str, Any], stage: str) -> float:
    """Training minutes a bundle's ``stage`` has had so far, over every run in its ``training_history``."""
    return float(sum(run.get("minutes", 0.0) for run in meta.get("training_history", []) if run.get("stage") == stage))


__all__ = ["bundle_part", "load_bundle_weights", "stage_minutes"]
