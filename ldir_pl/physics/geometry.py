"""CT acquisition geometry as a small, hashable config object that builds its ODL counterparts.

One frozen dataclass is the single source of truth: the ODL reference operator, the exported sparse
matrix (cached under ``key()``) and the classical baselines are all derived from it, so the backends
cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import odl
from odl.applications import tomo

from ldir_pl.errors import ConfigError

BEAMS = ("parallel", "fan")


@dataclass(frozen=True)
class CTGeometry:
    """2-D parallel- or fan-beam geometry.

    ``angle_range_deg`` covers sparse-view (many fewer views over the full range) and limited-angle
    (a shorter range) set-ups. ``det_count=None`` takes ODL's sampling-theory default for the image.
    The image covers ``[-extent, extent]^2`` with ``image_size`` pixels a side.
    """

    beam: str
    num_views: int
    image_size: int
    angle_range_deg: tuple[float, float] | None = None
    extent: float = 1.0
    det_count: int | None = None
    src_radius: float = 4.0
    det_radius: float = 4.0
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.beam not in BEAMS:
            raise ConfigError(f"physics.beam={self.beam!r}: expected one of {BEAMS}")
        if int(self.num_views) < 1:
            raise ConfigError(f"physics.num_views={self.num_views}: need at least one view")
        if int(self.image_size) < 8:
            raise ConfigError(f"physics.image_size={self.image_size}: need at least 8 pixels")
        if self.angle_range_deg is not None:
            a0, a1 = (float(a) for a in self.angle_range_deg)
            if not a1 > a0:
                raise ConfigError(f"physics.angle_range_deg={list(self.angle_range_deg)}: end must exceed start")
            object.__setattr__(self, "angle_range_deg", (a0, a1))
        if self.beam == "fan" and self.src_radius <= self.extent * math.sqrt(2):
            raise ConfigError(
                f"physics.src_radius={self.src_radius} lies inside the image (extent {self.extent}); "
                "the source must be outside the field of view"
            )

    # ------------------------------------------------------------------ identity
    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("_cache")
        d["angle_range_deg"] = list(self.angles_deg)
        d["det_count"] = self.detector_count
        return d

    def key(self) -> str:
        """Stable short hash of everything that defines the system matrix."""
        blob = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def angles_deg(self) -> tuple[float, float]:
        if self.angle_range_deg is not None:
            return self.angle_range_deg
        return (0.0, 180.0) if self.beam == "parallel" else (0.0, 360.0)

    @property
    def image_shape(self) -> tuple[int, int]:
        return (int(self.image_size), int(self.image_size))

    @property
    def sino_shape(self) -> tuple[int, int]:
        return (int(self.num_views), self.detector_count)

    @property
    def detector_count(self) -> int:
        return int(self.odl_geometry().det_partition.shape[0])

    # ------------------------------------------------------------------ ODL objects
    def odl_space(self, unit_weighting: bool = True) -> odl.DiscretizedSpace:
        """Image space; unit weighting makes ODL's adjoint the plain matrix transpose."""
        kwargs = {"weighting": 1.0} if unit_weighting else {}
        e = float(self.extent)
        return odl.uniform_discr([-e, -e], [e, e], self.image_shape, dtype="float32", **kwargs)

    def odl_geometry(self):
        if "geometry" in self._cache:
            return self._cache["geometry"]
        space = self.odl_space(unit_weighting=False)
        a0, a1 = (math.radians(a) for a in self.angles_deg)
        angles = odl.uniform_partition(a0, a1, int(self.num_views))
        if self.beam == "parallel":
            ref = tomo.parallel_beam_geometry(space, num_angles=int(self.num_views))
            det = ref.det_partition
            if self.det_count is not None:
                det = odl.uniform_partition(det.min_pt[0], det.max_pt[0], int(self.det_count))
            geom = tomo.Parallel2dGeometry(angles, det)
        else:
            ref = tomo.cone_beam_geometry(
                space, float(self.src_radius), float(self.det_radius), num_angles=int(self.num_views)
            )
            det = ref.det_partition
            if self.det_count is not None:
                det = odl.uniform_partition(det.min_pt[0], det.max_pt[0], int(self.det_count))
            geom = tomo.FanBeamGeometry(angles, det, float(self.src_radius), float(self.det_radius))
        self._cache["geometry"] = geom
        return geom

    def odl_ray_transform(self, impl: str = "astra_cpu", unit_weighting: bool = True):
        """ODL's RayTransform; ``unit_weighting=False`` gives the physically weighted one FBP/TV expect."""
        key = ("ray", impl, unit_weighting)
        if key not in self._cache:
            self._cache[key] = tomo.RayTransform(
                self.odl_space(unit_weighting), self.odl_geometry(), impl=impl
            )
        return self._cache[key]
