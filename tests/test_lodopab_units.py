"""``physics=lodopab`` in LoDoPaB-CT's own units: an observation written in LoDoPaB's convention (built here
with ODL directly, independently of the project's operator) is what the project simulates, and an
observation file in LoDoPaB's layout reconstructs with FBP to the phantom's expected PSNR."""

import json

import h5py
import numpy as np
import odl
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from odl.applications import tomo
from test_reconstruct_app import _run

from ldir_pl.config import CONF_DIR
from ldir_pl.data.phantom import ellipse_phantom

MU_MAX, PHOTONS, SIZE = 81.35858, 4096, 362


def lodopab_ray_transform():
    """LoDoPaB's published geometry: 26 cm square, 1000 parallel views, 513 bins."""
    space = odl.uniform_discr([-0.13, -0.13], [0.13, 0.13], (SIZE, SIZE), dtype="float32")
    geometry = tomo.parallel_beam_geometry(space, num_angles=1000, det_shape=(513,))
    return tomo.RayTransform(space, geometry, impl="astra_cpu")


def lodopab_observation(x: np.ndarray, ray, rng: np.random.Generator) -> np.ndarray:
    """-log(max(N, 0.1) / N0) / mu_max with N ~ Poisson(N0 exp(-mu_max A x)): the dataset's convention."""
    counts = rng.poisson(PHOTONS * np.exp(-MU_MAX * ray(x).data)).astype(np.float64)
    return (-np.log(np.maximum(counts, 0.1) / PHOTONS) / MU_MAX).astype(np.float32)


@pytest.fixture(scope="module")
def physics():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("reconstruct", ["physics=lodopab", "data=lodopab", "data.root=/unused", "data.image_size=362"])
    return instantiate(cfg.physics)


@pytest.fixture(scope="module")
def phantom():
    return ellipse_phantom(SIZE, seed=3)


def test_geometry_and_noise_are_lodopabs(physics, phantom):
    assert physics.meas_shape == (1000, 513) and physics.image_shape == (SIZE, SIZE)
    assert physics.geometry.extent == 0.13 and physics.noise.photons == PHOTONS and physics.noise.mu == MU_MAX
    ray = lodopab_ray_transform()
    clean_ref = ray(phantom[0].numpy()).data
    clean = physics.A(phantom[None]).numpy()[0, 0]
    assert np.abs(clean - clean_ref).max() <= 1e-4 * np.abs(clean_ref).max()
    assert 0.5 * clean_ref.max() < clean.max() < 0.26 * 1.01  # line integrals in metres of a [0, 1] image
    y = physics.measure(phantom[None], ["p"]).numpy()[0, 0]
    # post-log noise: unbiased where counts are high, variance exp(mu A x) / (N0 mu^2) per bin
    resid = (y - clean_ref) / np.sqrt(np.exp(MU_MAX * clean_ref) / PHOTONS) * MU_MAX
    assert abs(resid.mean()) < 0.05 and 0.9 < resid.std() < 1.1
    ref = lodopab_observation(phantom[0].numpy(), ray, np.random.default_rng(0))
    assert abs(np.std(y - clean_ref) / np.std(ref - clean_ref) - 1) < 0.05


def test_observation_file_reconstructs_with_fbp(tmp_path, phantom):
    ray, rng = lodopab_ray_transform(), np.random.default_rng(1)
    truth = np.stack([phantom[0].numpy(), ellipse_phantom(SIZE, seed=4)[0].numpy()])
    with h5py.File(tmp_path / "ground_truth_test_000.hdf5", "w") as f:
        f["data"] = truth
    with h5py.File(tmp_path / "observation_test_000.hdf5", "w") as f:
        f["data"] = np.stack([lodopab_observation(t, ray, rng) for t in truth])
    common = ["data=lodopab", f"data.root={tmp_path}", "data.image_size=362", "physics=lodopab", "sampler=fbp",
              "baselines=[]", "num_panels=1", "save_reconstructions=false", "data.num_workers=0"]
    _run([*common, "data.use_observations=true", f"output_dir={tmp_path / 'measured'}"])
    _run([*common, f"output_dir={tmp_path / 'simulated'}"])
    measured, simulated = (json.loads((tmp_path / d / "summary.json").read_text())["fbp"]
                           for d in ("measured", "simulated"))
    assert measured["n"] == 2 and measured["psnr"] > 28
    assert abs(measured["psnr"] - simulated["psnr"]) < 0.3  # same convention, different noise draws
    wrong = _run([*common, "data.use_observations=true", "physics.num_views=500",
                  f"output_dir={tmp_path / 'wrong'}"], check=False)
    assert wrong.returncode != 0 and "observation_test_000.hdf5" in wrong.stderr and "1000" in wrong.stderr
