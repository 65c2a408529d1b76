"""Export and cache the system matrix of the exact ASTRA projector ODL uses.

ODL's ``astra_cpu`` forward applies ASTRA's projector with no extra scaling, so the matrix ASTRA
returns for the same volume/projection geometries and projector type *is* ODL's operator (with unit
weighting, its adjoint is the transpose). Exporting once and applying it with a sparse matmul
batches the whole minibatch on CPU or GPU instead of looping over images.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import astra
import numpy as np
import scipy.sparse as sp
from odl.applications.tomo.backends.astra_cpu import default_astra_proj_type
from odl.applications.tomo.backends.astra_setup import (
    astra_projection_geometry,
    astra_projector,
    astra_volume_geometry,
)

from ldir_pl.physics.geometry import CTGeometry

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    root = os.environ.get("LDIR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ldir_pl"
    )
    return Path(root) / "system_matrices"


def export_system_matrix(geometry: CTGeometry) -> sp.csr_matrix:
    """Ask ASTRA for the (num_views*det_count, H*W) matrix of ODL's default projector."""
    space = geometry.odl_space(unit_weighting=True)
    odl_geom = geometry.odl_geometry()
    vol_geom = astra_volume_geometry(space, "cpu")
    proj_geom = astra_projection_geometry(odl_geom, "cpu")
    proj_id = astra_projector(default_astra_proj_type(odl_geom), vol_geom, proj_geom, 2)
    try:
        mat_id = astra.projector.matrix(proj_id)
        try:
            mat = astra.matrix.get(mat_id)
        finally:
            astra.matrix.delete(mat_id)
    finally:
        astra.projector.delete(proj_id)
    mat = sp.csr_matrix(mat, dtype=np.float32)
    expected = (int(np.prod(geometry.sino_shape)), int(np.prod(geometry.image_shape)))
    if mat.shape != expected:
        raise RuntimeError(f"ASTRA returned a {mat.shape} matrix, expected {expected} for {geometry}")
    mat.sum_duplicates()
    return mat


def load_system_matrix(geometry: CTGeometry, cache_dir: str | Path | None = None) -> sp.csr_matrix:
    """The cached matrix for ``geometry``, exporting (and caching) it on first use."""
    path = Path(cache_dir or default_cache_dir()) / f"{geometry.key()}.npz"
    if path.exists():
        try:
            return sp.load_npz(path).tocsr()
        except Exception as err:  # a truncated cache file must not poison every later run
            log.warning("ignoring unreadable system-matrix cache %s (%s); re-exporting", path, err)
    t0 = time.perf_counter()
    mat = export_system_matrix(geometry)
    log.info("exported %s system matrix %s (nnz %d) in %.2fs", geometry.beam, mat.shape, mat.nnz,
             time.perf_counter() - t0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        sp.save_npz(tmp, mat, compressed=False)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache system matrix at %s: %s", path, err)
    return mat
