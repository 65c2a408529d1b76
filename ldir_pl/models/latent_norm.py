"""Per-channel standardisation of a VAE's latents, folded into its 1x1 quant convolutions.

The KL-regularised latent of a small autoencoder has channels of very different spread (0.15 to 1.2 in a
CT VAE), so under the diffusion's isotropic noise some channels are drowned many steps before others.
Standardising each channel fixes that. Folding the affine map into ``quant_conv`` (encoder side) and
``post_quant_conv`` (decoder side) leaves an ordinary ``AutoencoderKL`` whose latents already have zero
mean and unit variance per channel, so diffusers' own pipelines and every sampler use it unchanged, with
a scaling factor of 1.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from ldir_pl.errors import ConfigError


def channel_moments(mean: Tensor, std: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of posterior samples, from the posterior means (N, C, h, w)
    and standard deviations (or of the means alone when ``std`` is None)."""
    m = mean.double().mean(dim=(0, 2, 3))
    var = mean.double().var(dim=(0, 2, 3))
    if std is not None:
        var = var + std.double().pow(2).mean(dim=(0, 2, 3))
    return m.float(), var.clamp_min(1e-24).sqrt().float()


@torch.no_grad()
def fold_channel_normalization(vae: AutoencoderKL, shift: Tensor, scale: Tensor) -> None:
    """Make ``vae`` encode to ``(z - shift) / scale`` and decode that back to what ``z`` decoded to."""
    quant, post = vae.quant_conv, vae.post_quant_conv
    if quant is None or post is None:
        raise ConfigError("latent normalisation needs an AutoencoderKL with quant_conv and post_quant_conv")
    c = int(vae.config.latent_channels)
    if shift.shape != (c,) or scale.shape != (c,):
        raise ConfigError(f"latent normalisation: expected {c} shifts and scales, got {tuple(shift.shape)}, "
                         f"{tuple(scale.shape)}")
    shift = shift.to(quant.weight)
    scale = scale.to(quant.weight)
    # encoder: moments = [mean (c), logvar (c)]; mean' = (mean - shift) / scale, logvar' = logvar - 2 log scale
    quant.weight[:c] /= scale.view(c, 1, 1, 1)
    quant.bias[:c] = (quant.bias[:c] - shift) / scale
    quant.bias[c:] -= 2.0 * scale.log()
    # decoder: z = scale * z' + shift enters post_quant_conv
    post.bias += post.weight[:, :, 0, 0] @ shift
    post.weight *= scale.view(1, c, 1, 1)
