"""Measurement models behind one contract (``LinearPhysics``: A, A_adjoint, A_dagger, measure, check):
CT (ray transform with ODL reference / sparse-matrix backends), blur, inpainting, super-resolution."""

from ldir_pl.physics.base import LinearPhysics
from ldir_pl.physics.blur import Blur
from ldir_pl.physics.ct import CTPhysics
from ldir_pl.physics.geometry import CTGeometry
from ldir_pl.physics.inpainting import Inpainting
from ldir_pl.physics.noise import GaussianNoise, NoiseModel, NoNoise, PoissonNoise, image_seed
from ldir_pl.physics.ray_transform import RayTransform
from ldir_pl.physics.superres import SuperResolution
from ldir_pl.physics.volume import VolumePhysics

__all__ = ["Blur", "CTGeometry", "CTPhysics", "GaussianNoise", "Inpainting", "LinearPhysics", "NoiseModel", "NoNoise",
           "PoissonNoise", "RayTransform", "SuperResolution", "VolumePhysics", "image_seed"]
