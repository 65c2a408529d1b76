import numpy as np
import odl
import torch
from tiny import NOISE

from ldir_pl.data import DicomDataModule, PhantomDataModule
from ldir_pl.metrics import psnr, ssim
from ldir_pl.physics import CTPhysics, NoNoise
from ldir_pl.sampling import PseudoInverse, TVReconstructor
from ldir_pl.sampling.tv import forward_diff, forward_diff_t

# ../shared/data/README.md: first 6 files in name order, reference PSNR / SSIM
REFERENCE = {23: {"fbp": (28.6, 0.61), "tv": (33.3, 0.88)}, 10: {"fbp": (23.2, 0.41), "tv": (29.2, 0.77)}}


def _phantoms(n=2, size=64):
    items = PhantomDataModule(image_size=size, num_test=n).items("test")
    return torch.stack([f() for _, f in items]), [i for i, _ in items]


def test_gradient_transpose():
    x, p = torch.rand(2, 1, 16, 12), torch.rand(2, 2, 16, 12)
    h = (0.1, 0.2)
    assert torch.allclose((forward_diff(x, h) * p).sum(), (x * forward_diff_t(p, h)).sum(), rtol=1e-5)


def odl_tv(y: torch.Tensor, x0: torch.Tensor, physics: CTPhysics, weight: float, iterations: int) -> torch.Tensor:
    """The reference protocol's TV problem solved by ``odl.solvers.pdhg`` image by image, balanced as ours."""
    ray = physics.geometry.odl_ray_transform(physics.ray.impl, unit_weighting=False)
    grad = odl.Gradient(ray.domain)
    start = odl.phantom.white_noise(ray.domain, seed=0)
    scale = odl.power_method_opnorm(ray, maxiter=60, xstart=start) / odl.power_method_opnorm(grad, maxiter=60,
                                                                                            xstart=start)
    L = odl.BroadcastOperator(ray, scale * grad)
    step = 1.0 / (1.1 * odl.power_method_opnorm(L, maxiter=60, xstart=start))
    f = odl.functionals.IndicatorBox(ray.domain, 0.0, 1.0)
    out = []
    for sino, x_start in zip(y.numpy(), x0.numpy()):
        data = odl.functionals.L2NormSquared(ray.range).translated(ray.range.element(sino[0]))
        g = odl.functionals.SeparableSum(data, (weight / scale) * odl.functionals.L1Norm(grad.range))
        x = ray.domain.element(x_start[0])
        odl.solvers.pdhg(x, f, g, L, niter=iterations, tau=step, sigma=step)
        out.append(np.asarray(x.data, dtype=np.float32))
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


def test_tv_matches_odl_pdhg():
    x, ids = _phantoms()
    physics = CTPhysics(num_views=16, image_size=64, noise=NOISE)
    y = physics.measure(x, ids)
    ours = TVReconstructor(weight=3e-5, max_iterations=60, tol=0.0).reconstruct(y, physics)
    ref = odl_tv(y, physics.A_dagger(y).clamp(0, 1), physics, weight=3e-5, iterations=60)
    assert (ours - ref).abs().max() < 2e-3


def test_tv_stops_when_converged_and_images_do_not_depend_on_their_batch():
    x, ids = _phantoms(3)
    physics = CTPhysics(num_views=16, image_size=64, noise=NOISE)
    y = physics.measure(x, ids)
    tv = TVReconstructor(weight=3e-5, max_iterations=5000, tol=1e-4)
    res = tv.solve(y, physics)
    assert all(10 <= k < 5000 and k % 10 == 0 for k in res.iterations)
    # converged: far more iterations move the result by little
    long = TVReconstructor(weight=3e-5, max_iterations=5000, tol=1e-7).solve(y, physics)
    assert float(psnr(res.x, long.x).min()) > 45
    # an image stops where it converged, whatever else is in its batch
    alone = tv.solve(y[1:2], physics)
    assert alone.iterations == res.iterations[1:2]
    assert torch.allclose(alone.x, res.x[1:2], atol=1e-5)


def test_baselines_improve_with_views_and_tv_beats_fbp():
    x, ids = _phantoms()
    scores = {}
    for views in (8, 32):
        physics = CTPhysics(num_views=views, image_size=64, noise=NoNoise())
        y = physics.measure(x, ids)
        scores[views] = {m.name: float(psnr(m.reconstruct(y, physics), x).mean())
                         for m in (PseudoInverse("fbp"), TVReconstructor(weight=1e-4, max_iterations=150, tol=0.0))}
    assert scores[32]["fbp"] > scores[8]["fbp"] + 2
    assert scores[8]["tv"] > scores[8]["fbp"] + 2


def test_reference_figures_on_shared_ct(shared_dicom):
    dm = DicomDataModule(root=str(shared_dicom))
    dm.setup()
    items = sorted(dm.items("all"))[:6]
    x, ids = torch.stack([f() for _, f in items]), [i for i, _ in items]
    for views, ref in REFERENCE.items():
        physics = CTPhysics(num_views=views, image_size=256, noise=NOISE)
        y = physics.measure(x, ids)
        for method in (PseudoInverse("fbp"), TVReconstructor(weight=3e-5, max_iterations=400, tol=0.0)):
            rec = method.reconstruct(y, physics)
            got_psnr, got_ssim = float(psnr(rec, x).mean()), float(ssim(rec, x).mean())
            ref_psnr, ref_ssim = ref[method.name]
            assert abs(got_psnr - ref_psnr) < 0.5, (views, method.name, got_psnr)
            assert abs(got_ssim - ref_ssim) < 0.03, (views, method.name, got_ssim)
