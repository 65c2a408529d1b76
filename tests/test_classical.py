import torch

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


def test_torch_tv_matches_odl_pdhg():
    x, ids = _phantoms()
    physics = CTPhysics(num_views=16, image_size=64)
    y = physics.measure(x, ids)
    ours = TVReconstructor(iterations=60, solver="torch").reconstruct(y, physics)
    ref = TVReconstructor(iterations=60, solver="odl").reconstruct(y, physics)
    assert (ours - ref).abs().max() < 2e-3


def test_baselines_improve_with_views_and_tv_beats_fbp():
    x, ids = _phantoms()
    scores = {}
    for views in (8, 32):
        physics = CTPhysics(num_views=views, image_size=64, noise=NoNoise())
        y = physics.measure(x, ids)
        scores[views] = {m.name: float(psnr(m.reconstruct(y, physics), x).mean())
                         for m in (PseudoInverse("fbp"), TVReconstructor(iterations=150, weight=1e-4))}
    assert scores[32]["fbp"] > scores[8]["fbp"] + 2
    assert scores[8]["tv"] > scores[8]["fbp"] + 2


def test_reference_figures_on_shared_ct(shared_dicom):
    dm = DicomDataModule(root=str(shared_dicom))
    dm.setup()
    items = sorted(dm.items("all"))[:6]
    x, ids = torch.stack([f() for _, f in items]), [i for i, _ in items]
    for views, ref in REFERENCE.items():
        physics = CTPhysics(num_views=views)
        y = physics.measure(x, ids)
        for method in (PseudoInverse("fbp"), TVReconstructor()):
            rec = method.reconstruct(y, physics)
            got_psnr, got_ssim = float(psnr(rec, x).mean()), float(ssim(rec, x).mean())
            ref_psnr, ref_ssim = ref[method.name]
            assert abs(got_psnr - ref_psnr) < 0.5, (views, method.name, got_psnr)
            assert abs(got_ssim - ref_ssim) < 0.03, (views, method.name, got_ssim)
