import os
from pathlib import Path

import pytest
import torch

from ldir_pl.config import register_resolvers

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-dicom"

register_resolvers()  # tests compose conf/ with Hydra's own API too
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for bit-identical GPU tests
# OMP_NUM_THREADS=1 when the suite shares the machine with a training run
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _isolated_matrix_cache(tmp_path_factory, monkeypatch):
    """System matrices cached per test session, never in the user's ~/.cache."""
    monkeypatch.setenv("LDIR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "matrices"))


@pytest.fixture(scope="module")
def latent_bundle():
    """A tiny latent prior (real diffusers VAE + UNet, random weights) for 32x32 images."""
    from tiny import tiny_latent_bundle

    return tiny_latent_bundle()


@pytest.fixture(scope="module")
def pixel_bundle():
    """A tiny pixel prior (real diffusers UNet, random weights) for 32x32 images."""
    from tiny import tiny_pixel_bundle

    return tiny_pixel_bundle()


@pytest.fixture(scope="module")
def ct_physics():
    """Parallel beam, 8 views, 32x32, 1% Gaussian noise."""
    from ldir_pl.physics import CTPhysics, GaussianNoise

    return CTPhysics(beam="parallel", num_views=8, image_size=32, noise=GaussianNoise(relative=0.01))


@pytest.fixture
def tiny_train_config(tmp_path):
    """The training config at test sizes (``debug=tiny``) writing under ``tmp_path``."""
    from ldir_pl.apps.train import compose_config

    return compose_config(["experiment=demo", "debug=tiny", "logger=none", f"output_dir={tmp_path / 'out'}"])


@pytest.fixture
def shared_dicom() -> Path:
    if not SHARED_DICOM.is_dir():
        pytest.skip(f"real CT slices not present at {SHARED_DICOM} (../shared/data/ct-dicom)")
    return SHARED_DICOM


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests skip with a reason on machines without a GPU; their CPU twins always run."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `make gpu-check` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
