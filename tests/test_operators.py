"""Every measurement model through the same contract: adjointness, shapes, dtype, seeded noise, the
pseudo-inverse, clear errors, and every ``conf/physics`` file builds its operator."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tiny import NOISE

from ldir_pl.config import CONF_DIR
from ldir_pl.physics import Blur, CTPhysics, Inpainting, LinearPhysics, SuperResolution

N = 32
OPERATORS = {
    "ct-parallel-sparse": lambda: CTPhysics(num_views=12, image_size=N, noise=NOISE),
    "ct-parallel-odl": lambda: CTPhysics(num_views=12, image_size=N, backend="odl", noise=NOISE),
    "ct-fan": lambda: CTPhysics(beam="fan", num_views=16, image_size=N, noise=NOISE),
    "ct-limited-angle": lambda: CTPhysics(num_views=20, angle_range_deg=(0, 120), image_size=N, noise=NOISE),
    "blur-gaussian-circular": lambda: Blur(image_size=N, sigma=1.5, noise=NOISE),
    "blur-kernel-zero": lambda: Blur(image_size=N, kernel=[[0, 0.2, 0], [0.1, 0.4, 0.1], [0, 0.2, 0]],
                                     boundary="zero", noise=NOISE),
    "inpainting-random": lambda: Inpainting(image_size=N, missing=0.5, noise=NOISE),
    "inpainting-box": lambda: Inpainting(image_size=N, mask="box", missing=0.25, noise=NOISE),
    "superres-2": lambda: SuperResolution(image_size=N, factor=2, noise=NOISE),
    "superres-4": lambda: SuperResolution(image_size=N, factor=4, noise=NOISE),
}


@pytest.fixture(params=list(OPERATORS), scope="module")
def physics(request) -> LinearPhysics:
    return OPERATORS[request.param]()


def _inner(a, b) -> float:
    return float((a.double() * b.double()).sum())


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, N, N, generator=torch.Generator().manual_seed(seed))


def test_adjointness_and_shapes(physics):
    x = _images()
    y = torch.rand(3, 1, *physics.meas_shape, generator=torch.Generator().manual_seed(1))
    ax, aty = physics.A(x), physics.A_adjoint(y)
    assert ax.shape == (3, 1, *physics.meas_shape) and aty.shape == x.shape
    assert ax.dtype == aty.dtype == torch.float32
    lhs, rhs = _inner(ax, y), _inner(x, aty)
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs), (lhs, rhs)
    assert torch.allclose(physics(x), ax)  # the module call is A


def test_autograd_backward_is_the_adjoint(physics):
    x = _images(2).requires_grad_(True)
    y = torch.rand(2, 1, *physics.meas_shape, generator=torch.Generator().manual_seed(2))
    (physics.A(x) * y).sum().backward()
    assert torch.allclose(x.grad, physics.A_adjoint(y), rtol=1e-4, atol=1e-5 * float(x.grad.abs().max()))


def test_pseudo_inverse_explains_the_data(physics):
    x = _images(2)
    ax = physics.A(x)
    xd = physics.A_dagger(ax)
    assert xd.shape == x.shape and torch.isfinite(xd).all()
    if physics.family == "ct":  # FBP: an approximate inverse, far closer than zero
        assert (physics.A(xd) - ax).norm() < 0.5 * ax.norm()
    else:  # closed forms are exact; CG from zero has reduced the residual a lot
        assert (physics.A(xd) - ax).norm() < 0.05 * ax.norm()


def test_seeded_noise_per_image(physics):
    x = _images(3)
    a = physics.measure(x, ["a", "b", "c"])
    b = physics.measure(x[[2, 0]], ["c", "a"])  # other batch, other order: the same noise per image
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], physics.measure(x[:1], ["z"])[0])
    with pytest.raises(ValueError, match="2 image ids for a batch of 3"):
        physics.measure(x, ["a", "b"])


def test_clear_errors(physics):
    bad = torch.zeros(1, 1, *(s + 1 for s in physics.meas_shape))
    with pytest.raises(ValueError, match=r"scan\.npy: measurement shape .* does not match the physics"):
        physics.check(bad, "scan.npy")
    y = torch.zeros(1, 1, *physics.meas_shape)
    y[..., 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        physics.check(y)
    with pytest.raises(ValueError, match="does not match"):
        physics.A(torch.zeros(1, 1, N + 2, N + 2))
    assert physics.label and physics.describe()["noise"]["kind"] == "gaussian"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "physics").glob("*.yaml")))
def test_every_physics_config_builds(name):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("reconstruct", [f"physics={name}", "data.image_size=64"])
    physics = instantiate(cfg.physics)
    assert isinstance(physics, LinearPhysics) and physics.noise.describe()["kind"] in ("gaussian", "poisson")
    size = 362 if name == "lodopab" else 64
    assert physics.image_shape == (size, size)


def test_operator_settings_are_checked():
    with pytest.raises(ValueError, match="boundary='mirror'"):
        Blur(image_size=N, boundary="mirror", noise=NOISE)
    with pytest.raises(ValueError, match="odd sides"):
        Blur(image_size=N, kernel=[[0.5, 0.5]], noise=NOISE)
    with pytest.raises(ValueError, match="factor=3"):
        SuperResolution(image_size=N, factor=3, noise=NOISE)
    with pytest.raises(ValueError, match="missing=1.0"):
        Inpainting(image_size=N, missing=1.0, noise=NOISE)
