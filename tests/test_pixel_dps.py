"""Pixel-space DPS baseline with a tiny real pixel UNet and a real 32x32 Physics."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ldir_pl.models.bundle import PriorBundle
from ldir_pl.physics import CTPhysics, GaussianNoise
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.pixel_dps import PixelDPSSampler

SIZE = 32


def tiny_pixel_bundle(size: int = SIZE) -> PriorBundle:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    return PriorBundle(unet=unet.eval(), scheduler=sched, vae=None, scaling_factor=1.0, image_size=size,
                       latent_shape=(1, size, size), kind="pixel",
                       metadata={"intensity_transform": {"type": "affine", "scale": 2.0, "shift": -1.0}})


@pytest.fixture(scope="module")
def bundle():
    return tiny_pixel_bundle()


@pytest.fixture(scope="module")
def physics():
    return CTPhysics(kind="parallel", num_views=8, image_size=SIZE, noise=GaussianNoise(relative=0.01))


def disc(n: int = 2) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    return torch.stack([0.3 * ((xx**2 + yy**2) < (0.5 + 0.1 * k) ** 2).float() for k in range(n)])[:, None]


def make(bundle, **kw):
    args = dict(num_steps=8, progress=False)
    args.update(kw)
    return PixelDPSSampler(bundle, **args)


def test_shapes_range_determinism_and_batch_order(bundle, physics):
    x = disc(2)
    y = physics.measure(x, ["p", "q"])
    s = make(bundle)
    assert s.name == "pixel_dps" and s.optimizer == "sgd" and s.eta == 1.0
    out = s.reconstruct(y, physics, ["p", "q"])
    assert out.shape == x.shape and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, s.reconstruct(y, physics, ["p", "q"]))
    rev = s.reconstruct(y.flip(0), physics, ["q", "p"]).flip(0)
    assert torch.allclose(out, rev, atol=1e-5)


def test_guidance_reduces_misfit_under_inference_mode(bundle, physics):
    x = disc(2)
    fid = DataFidelity(2, squared=True)
    with torch.inference_mode():
        y = physics.measure(x, [0, 1])
        free = make(bundle, lr=0.0).reconstruct(y, physics, [0, 1])
        guided = make(bundle, lr=20.0).reconstruct(y, physics, [0, 1])
    assert (fid(y, physics.A(guided)) < 0.5 * fid(y, physics.A(free))).all()


def test_errors(bundle, physics):
    from test_ldir_sampler import tiny_latent_bundle  # noqa: PLC0415 - sibling test helper

    with pytest.raises(ValueError, match="pixel"):
        PixelDPSSampler(tiny_latent_bundle())
    big = CTPhysics(kind="parallel", num_views=8, image_size=2 * SIZE)
    with pytest.raises(ValueError, match=r"32x32.*64x64"):
        make(bundle).reconstruct(torch.zeros(1, 1, *big.meas_shape), big, [0])
    y = physics.measure(disc(1), [0])
    y[..., 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make(bundle).reconstruct(y, physics, [0])


def test_hydra_config(bundle, physics, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldir_pl.models.bundle import save_prior

    path = save_prior(tmp_path / "pixel", None, bundle.unet, bundle.scheduler, {"image_size": SIZE})
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(overrides=["+sampler=pixel_dps", f"+prior.pixel_path={path}", "+seed=0",
                                 "sampler.num_steps=3", "sampler.progress=false"])
    s = instantiate(cfg.sampler)
    assert isinstance(s, PixelDPSSampler)
    out = s.reconstruct(physics.measure(disc(1), [0]), physics, [0])
    assert out.shape == (1, 1, SIZE, SIZE)
