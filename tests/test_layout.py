"""The house: the library imports and runs without the commands' config folder; callbacks stand alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NOTEBOOK = """
import sys, torch
sys.path.insert(0, {tests!r})
import ldir_pl.data, ldir_pl.models, ldir_pl.physics, ldir_pl.sampling
from ldir_pl.physics import CTPhysics, GaussianNoise
from ldir_pl.sampling import GuidedDDIM, PseudoInverse, TVReconstructor
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.guidance import Guidance
from ldir_pl.sampling.history import Adam, StepSize
from ldir_pl.sampling.refine import AnchoredTV
from ldir_pl.sampling.warm_start import WarmStart
from tiny import phantom, tiny_latent_bundle
assert not [m for m in sys.modules if m.startswith(("ldir_pl.apps", "hydra"))], "library imported the apps or Hydra"
physics = CTPhysics(num_views=8, image_size=32, noise=GaussianNoise(relative=0.01))
y = physics.measure(phantom(2), [0, 1])
tv = TVReconstructor(weight=3e-5, max_iterations=50, tol=1e-4)
ldir = GuidedDDIM(prior=tiny_latent_bundle(), guidance=Guidance(DataFidelity(2, True, False), Adam(0.9, 0.999, 1e-8,
                  "standard"), StepSize(0.05, "linear", 0.1), "zt", 1, 2, 0.1), init=WarmStart(PseudoInverse("fbp"), 0.3),
                  refine=AnchoredTV(tv, 0.002), num_steps=3, eta=0.0, timestep_spacing="trailing", clip_sample=None,
                  num_samples=1, batch_size=None, seed=0, progress=False, name="ldir")
print(tuple(ldir.reconstruct(y, physics, [0, 1]).shape))
"""


def test_library_runs_without_conf_and_without_the_apps(tmp_path):
    env = {**os.environ, "LDIR_CONF_DIR": str(tmp_path / "no_conf_here"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", NOTEBOOK.format(tests=str(ROOT / "tests"))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(2, 1, 32, 32)")


def test_callbacks_do_not_import_the_project():
    proc = subprocess.run([sys.executable, "-c", "import sys, callbacks; "
                           "assert not [m for m in sys.modules if m.startswith('ldir_pl')]"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_commands_live_in_the_apps_package():
    shared = ("__init__.py", "errors.py", "metrics.py", "config.py", "atomic.py", "interrupt.py")
    loose = sorted(p.name for p in (ROOT / "ldir_pl").glob("*.py") if p.name not in shared)
    assert not loose, f"modules beside the library's packages: {loose}"
    setup = (ROOT / "setup.cfg").read_text()
    for app in ("reconstruct", "train", "sample"):
        assert f"ldir-{app} = ldir_pl.apps.{app}:main" in setup


def test_training_imports_no_ray_transform():
    """A GPU machine without astra / odl trains: only building a ray transform imports them."""
    code = ("import sys, ldir_pl.apps.train, ldir_pl.data, ldir_pl.models, ldir_pl.config; "
            "from ldir_pl.config import compose; from hydra.utils import instantiate; "
            "instantiate(compose('train', ['experiment=ct_cpu_long', 'paths.data_dir=/nowhere']).model.vae); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('odl', 'astra')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
