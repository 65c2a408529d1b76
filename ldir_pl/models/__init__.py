"""Prior models: VAE, latent DDPM, pixel DDPM, and the exported prior bundle."""

from .bundle import PriorBundle, load_prior, save_prior
from .latent_diffusion import LatentDiffusionModule
from .nan_guard import NaNGuard, NonFiniteLossError
from .pixel_ddpm import PixelDDPMModule
from .vae import VAEModule, load_vae

__all__ = [
    "LatentDiffusionModule",
    "NaNGuard",
    "NonFiniteLossError",
    "PixelDDPMModule",
    "PriorBundle",
    "VAEModule",
    "load_prior",
    "load_vae",
    "save_prior",
]
