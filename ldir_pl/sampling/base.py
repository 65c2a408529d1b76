"""The interface every reconstruction method implements, classical or diffusion-based."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from ldir_pl.physics import LinearPhysics


@runtime_checkable
class Reconstructor(Protocol):
    """``reconstruct(y, physics, ids)`` maps measurements (B,1,V,D) to images (B,1,H,W) in [0, 1].

    ``ids`` identify the images (file names or indices) so stochastic methods draw the same noise for
    the same image whatever the batch. ``name`` is the key under which results are reported.
    """

    name: str

    def reconstruct(self, y: Tensor, physics: LinearPhysics, ids: Sequence[int | str]) -> Tensor: ...
