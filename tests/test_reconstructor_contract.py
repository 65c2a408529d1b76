"""One contract for every reconstruction method on every kind of operator: output shape (B,1,H,W), finite, read
from the measurement (and fitting it, for the methods that end data-consistent), the same image for the same
measurement and id whatever the batch, and the same under ``Trainer.predict`` (inference mode, Lightning's device
placement) as called directly."""

import pytest
import pytorch_lightning as pl
import torch
from tiny import NOISE, phantom, tiny_latent_bundle, tiny_pixel_bundle
from torch.utils.data import DataLoader

from ldir_pl.apps.predict_module import LDIRModule
from ldir_pl.config import load_sampler
from ldir_pl.physics import Blur, CTPhysics, Inpainting, SuperResolution
from ldir_pl.sampling import PseudoInverse, TVReconstructor

N = 32
PHYSICS = {
    "ct": lambda: CTPhysics(num_views=10, image_size=N, noise=NOISE),
    "blur": lambda: Blur(image_size=N, sigma=1.0, noise=NOISE),
    "inpainting": lambda: Inpainting(image_size=N, missing=0.5, noise=NOISE),
    "superres": lambda: SuperResolution(image_size=N, factor=2, noise=NOISE),
}
FAST = ["num_steps=3", "progress=false"]
METHODS = {
    "pinv": lambda: PseudoInverse("pinv"),
    "tv": lambda: TVReconstructor(weight=1e-4, max_iterations=30, tol=1e-4),
    "ldir": lambda: load_sampler("ldir", tiny_latent_bundle(N), [*FAST, "guidance.final_steps=2", "tv.max_iterations=10"]),
    "ldir_paper": lambda: load_sampler("ldir_paper", tiny_latent_bundle(N), FAST),
    "latent_dps": lambda: load_sampler("latent_dps", tiny_latent_bundle(N), [*FAST, "refine=null", "init=null"]),
    "pixel_dps": lambda: load_sampler("pixel_dps", tiny_pixel_bundle(N), FAST),
}


#: methods whose last step is data-consistent (an inverse, TV, or LDIR's refinement): they fit the measurement
DATA_CONSISTENT = ("pinv", "tv", "ldir")


@pytest.mark.parametrize("kind", list(PHYSICS))
@pytest.mark.parametrize("method", list(METHODS))
def test_contract(method, kind):
    physics, recon = PHYSICS[kind](), METHODS[method]()
    x = phantom(3, N)
    ids = ["a", "b", "c"]
    y = physics.measure(x, ids)
    out = recon.reconstruct(y, physics, ids)
    assert out.shape == x.shape and torch.isfinite(out).all()

    def misfit(img):
        return ((physics.A(img) - y) ** 2).flatten(1).sum(1)

    if method in DATA_CONSISTENT:  # the measurement is explained: the misfit falls far below the empty image's
        assert bool((misfit(out) < 0.02 * misfit(torch.zeros_like(x))).all()), (misfit(out), misfit(0 * x))
    # every method reads the measurement: another one (same ids, so the same noise) gives another image
    other = recon.reconstruct(physics.measure(x.flip(-1), ids), physics, ids)
    assert float((other - out).abs().amax(dim=(1, 2, 3)).min()) > 1e-4
    again = recon.reconstruct(y[[2, 1]], physics, ["c", "b"])  # other batch, other order
    # the same noise and steps per image: only the summation order of batched network calls differs, which the
    # 3 ancestral steps of pixel DPS amplify to ~4e-5 on a few pixels; a seeding or ordering bug moves whole
    # images by more than 1e-2
    assert torch.allclose(again, out[[2, 1]], atol=1e-4)


class _Measurements(torch.utils.data.Dataset):
    def __init__(self, x, y, ids):
        self.x, self.y, self.ids = x, y, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "id": self.ids[i]}


@pytest.mark.parametrize("kind", ["ct", "superres"])
def test_predict_loop_equals_direct_call(kind):
    physics = PHYSICS[kind]()
    x = phantom(3, N)
    ids = ["a", "b", "c"]
    y = physics.measure(x, ids)
    methods = {"tv": METHODS["tv"](), "ldir": METHODS["ldir"]()}
    direct = {k: m.reconstruct(y, physics, ids) for k, m in methods.items()}
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    preds = trainer.predict(LDIRModule(methods, physics), DataLoader(_Measurements(x, y, ids), batch_size=2))
    for name, ref in direct.items():
        got = torch.cat([p["recon"][name] for p in preds])
        assert torch.allclose(got, ref.clamp(0, 1), atol=1e-5), name
    assert [i for p in preds for i in p["id"]] == ids
