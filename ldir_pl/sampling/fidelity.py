"""Data-fidelity loss L(x) = ||y - A x||_p (optionally to the power p), per image.

``p`` in {1, 2}. ``squared=True`` returns ||r||_p^p (sum of |r|^p); ``squared=False`` the norm itself,
whose gradient is the DPS-normalised one (Chung et al. 2023 step ``zeta / ||y - A x0||``:
grad ||r||_2 = grad ||r||_2^2 / (2 ||r||_2)). For p = 1 both are the same. ``normalize=True`` divides by
||y||_p (^p when squared) so the loss is scale-free across images and intensity ranges.
"""

from __future__ import annotations

from torch import Tensor

from ldir_pl.errors import ConfigError


class DataFidelity:
    def __init__(self, p: int = 2, squared: bool = True, normalize: bool = False) -> None:
        if int(p) not in (1, 2):
            raise ConfigError(f"fidelity p={p}: expected 1 or 2")
        self.p, self.squared, self.normalize = int(p), bool(squared), bool(normalize)

    def residual_norm(self, r: Tensor) -> Tensor:
        """||r||_p per image, shape (B,)."""
        flat = r.flatten(1)
        return flat.abs().sum(1) if self.p == 1 else flat.pow(2).sum(1).sqrt()

    def __call__(self, y: Tensor, ax: Tensor) -> Tensor:
        """Per-image loss, shape (B,)."""
        r = (y - ax).flatten(1)
        if self.p == 1:
            loss = r.abs().sum(1)
        elif self.squared:
            loss = r.pow(2).sum(1)
        else:
            # sqrt with a floor: finite gradient when the residual vanishes
            loss = (r.pow(2).sum(1) + 1e-12).sqrt()
        if self.normalize:
            ref = self.residual_norm(y.detach()).clamp_min(1e-12)
            if self.squared and self.p == 2:
                ref = ref.pow(2)
            loss = loss / ref
        return loss

    def describe(self) -> dict:
        return {"p": self.p, "squared": self.squared, "normalize": self.normalize}


__all__ = ["DataFidelity"]
