"""CT physics: geometry, differentiable ray transform (ODL reference / sparse-matrix backends), noise."""

from ldir_pl.physics.geometry import CTGeometry
from ldir_pl.physics.noise import GaussianNoise, NoiseModel, NoNoise, PoissonNoise, image_seed
from ldir_pl.physics.physics import Physics
from ldir_pl.physics.ray_transform import RayTransform

__all__ = ["CTGeometry", "GaussianNoise", "NoiseModel", "NoNoise", "Physics", "PoissonNoise", "RayTransform",
           "image_seed"]
