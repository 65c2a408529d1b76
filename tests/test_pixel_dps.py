"""Pixel-space DPS (``sampler=pixel_dps``: the guided loop in image space) with a tiny real pixel UNet."""

import pytest
import torch
from test_ldir_sampler import make as make_sampler
from tiny import NOISE, SIZE

from ldir_pl.physics import CTPhysics
from ldir_pl.sampling import GuidedDDIM
from ldir_pl.sampling.fidelity import DataFidelity


def disc(n: int = 2) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    return torch.stack([0.3 * ((xx**2 + yy**2) < (0.5 + 0.1 * k) ** 2).float() for k in range(n)])[:, None]


def make(pixel_bundle, **kw):
    """``conf/sampler/pixel_dps.yaml`` as configured, 8 steps."""
    return make_sampler(pixel_bundle, "pixel_dps", **{"num_steps": 8, "lr": 1.0, "refine": "none", "warm_start": None,
                                                 "progress": False, **kw})


def test_shapes_range_determinism_and_batch_order(pixel_bundle, ct_physics):
    x = disc(2)
    y = ct_physics.measure(x, ["p", "q"])
    s = make(pixel_bundle)
    assert s.name == "pixel_dps" and type(s.guidance.update).__name__ == "SGD" and s.eta == 1.0
    assert s.scheduler.config.clip_sample and s.scheduler.config.clip_sample_range == 1.0
    out = s.reconstruct(y, ct_physics, ["p", "q"])
    assert out.shape == x.shape and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, s.reconstruct(y, ct_physics, ["p", "q"]))
    rev = s.reconstruct(y.flip(0), ct_physics, ["q", "p"]).flip(0)
    assert torch.allclose(out, rev, atol=1e-5)


def test_guidance_reduces_misfit_under_inference_mode(pixel_bundle, ct_physics):
    x = disc(2)
    fid = DataFidelity(2, squared=True)
    with torch.inference_mode():
        y = ct_physics.measure(x, [0, 1])
        free = make(pixel_bundle, lr=0.0).reconstruct(y, ct_physics, [0, 1])
        guided = make(pixel_bundle, lr=20.0).reconstruct(y, ct_physics, [0, 1])
    assert (fid(y, ct_physics.A(guided)) < 0.5 * fid(y, ct_physics.A(free))).all()


def test_errors(pixel_bundle, ct_physics):
    big = CTPhysics(beam="parallel", num_views=8, image_size=2 * SIZE, noise=NOISE)
    with pytest.raises(ValueError, match=r"32x32.*64x64"):
        make(pixel_bundle).reconstruct(torch.zeros(1, 1, *big.meas_shape), big, [0])
    y = ct_physics.measure(disc(1), [0])
    y[..., 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make(pixel_bundle).reconstruct(y, ct_physics, [0])


def test_hydra_config(pixel_bundle, ct_physics, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldir_pl.models.bundle import save_prior

    path = save_prior(tmp_path / "pixel", None, pixel_bundle.unet, pixel_bundle.scheduler, {"image_size": SIZE})
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(overrides=["+sampler=pixel_dps", f"+prior.pixel_path={path}", "+seed=0",
                                 "sampler.num_steps=3", "sampler.progress=false"])
    s = instantiate(cfg.sampler)
    assert isinstance(s, GuidedDDIM) and s.prior.kind == "pixel"
    out = s.reconstruct(ct_physics.measure(disc(1), [0]), ct_physics, [0])
    assert out.shape == (1, 1, SIZE, SIZE)
