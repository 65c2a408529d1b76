"""Reconstruction methods: classical (pseudo-inverse / FBP, TV) and diffusion-guided (LDIR, latent DPS, pixel DPS)."""

from ldir_pl.sampling.base import Reconstructor
from ldir_pl.sampling.ldir import LDIRSampler
from ldir_pl.sampling.pinv import PseudoInverse
from ldir_pl.sampling.pixel_dps import PixelDPSSampler
from ldir_pl.sampling.tv import TVReconstructor

__all__ = ["LDIRSampler", "PixelDPSSampler", "PseudoInverse", "Reconstructor", "TVReconstructor"]
