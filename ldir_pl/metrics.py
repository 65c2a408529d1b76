"""Image-quality metrics on images in [0, 1] (data_range = 1), per image, via torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldir_pl.errors import ConfigError


def _check(x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape or x.ndim != 4:
        raise ConfigError(f"metrics need two (B,C,H,W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(ref.shape)}")


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image PSNR in dB, shape (B,)."""
    _check(x, ref)
    return peak_signal_noise_ratio(
        x.float(), ref.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


def ssim(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5), shape (B,)."""
    _check(x, ref)
    return structural_similarity_index_measure(
        x.float(), ref.float(), data_range=1.0, reduction="none"
    ).reshape(-1)


@torch.no_grad()
def image_metrics(x: Tensor, ref: Tensor) -> dict[str, Tensor]:
    return {"psnr": psnr(x, ref), "ssim": ssim(x, ref)}


def _planes(v: Tensor, axis: str) -> Tensor:
    """(S,1,H,W) volume -> its coronal (H planes of S x W) or sagittal (W planes of S x H) planes, (N,1,S,*)."""
    if axis == "coronal":
        return v[:, 0].permute(1, 0, 2).unsqueeze(1)
    return v[:, 0].permute(2, 0, 1).unsqueeze(1)


@torch.no_grad()
def volume_metrics(x: Tensor, ref: Tensor, tissue: float = 0.2) -> dict[str, Tensor]:
    """One volume (S,1,H,W) against its truth: PSNR / SSIM averaged over the axial slices, and over the coronal
    and sagittal planes that cut the body (truth above ``tissue``, i.e. above about -200 HU), where slice-wise
    methods show their stripes. SSIM of reformatted planes needs at least 11 slices (NaN otherwise)."""
    _check(x, ref)
    out = {k: v.mean().reshape(1) for k, v in image_metrics(x, ref).items()}
    for axis in ("coronal", "sagittal"):
        px, pr = _planes(x, axis), _planes(ref, axis)
        body = pr.flatten(1).amax(1) > tissue
        px, pr = (px[body], pr[body]) if bool(body.any()) else (px, pr)
        out[f"psnr_{axis}"] = psnr(px, pr).mean().reshape(1)
        out[f"ssim_{axis}"] = (ssim(px, pr).mean() if x.shape[0] >= 11 else torch.tensor(float("nan"))).reshape(1)
    return out
