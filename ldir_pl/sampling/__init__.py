"""Reconstruction methods: classical (pseudo-inverse / FBP, TV) and one guided-diffusion loop (``GuidedDDIM``)
that LDIR, latent DPS and pixel DPS configure (``conf/sampler/*.yaml``; ``ldir_pl.config.load_sampler`` builds one by name)."""

from ldir_pl.sampling.base import Reconstructor
from ldir_pl.sampling.guided_ddim import GuidedDDIM
from ldir_pl.sampling.pinv import PseudoInverse
from ldir_pl.sampling.tv import TVReconstructor

__all__ = ["GuidedDDIM", "PseudoInverse", "Reconstructor", "TVReconstructor"]
