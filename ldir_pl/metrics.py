"""Image-quality metrics on images in [0, 1] (data_range = 1), per image, via torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _check(x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"metrics need two (B,C,H,W) tensors of one shape, got {tuple(x.shape)} and "
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
