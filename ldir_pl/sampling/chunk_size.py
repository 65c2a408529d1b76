"""How many latents go through the networks at once when ``sampler.batch_size=auto``: as many as free GPU memory holds.

A guided step's memory is a fixed part (weights, the workspace of the kernels) plus a part that grows linearly
with the chunk (the UNet's and the decoder's activations kept for backward). Two probes, one latent and two,
run the step's heaviest work (UNet forward and backward, decoder forward and backward) and give both parts;
the chunk is then what fits in ``headroom`` of the free memory. A fixed number cannot be right for both a
16 GB card and an H200, and on a large card a chunk of 8 leaves the GPU mostly idle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldir_pl.errors import ConfigError

GiB = 1 << 30


def chunk_for_memory(peak_one: int, peak_two: int, free_bytes: int, n: int, headroom: float = 0.8,
                     cap: int = 256) -> int:
    """The largest chunk (1..min(n, cap)) whose predicted peak fits in ``headroom * free_bytes``, from the measured
    peak memory of the step's work on one latent and on two (the linear model's two points)."""
    if n <= 1:
        return 1
    per = max(int(peak_two) - int(peak_one), 1)
    fixed = max(int(peak_one) - per, 0)
    budget = headroom * free_bytes
    if fixed + per > budget:
        raise ConfigError(f"sampler.batch_size=auto: one latent needs about {(fixed + per) / GiB:.2f} GiB but "
                          f"{free_bytes / GiB:.2f} GiB of GPU memory are free; free memory or run on another device")
    return int(max(1, min(n, cap, (budget - fixed) // per)))


def free_cuda_bytes(device: torch.device) -> int:
    """Free memory on ``device``, counting what PyTorch's caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def cuda_peak_of(work: Callable[[int], None], device: torch.device) -> Callable[[int], int]:
    """The peak allocated above the current level while ``work(k)`` runs, as a function of ``k``."""

    def peak_of(k: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        work(k)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)

    return peak_of
