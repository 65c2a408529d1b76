"""The guided-DDIM sampler (LDIR and its variants) with tiny real diffusers models and a real 32x32 CT physics."""

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from test_config_defaults import target_defaults
from tiny import NOISE, SIZE, phantom, tiny_latent_bundle

from ldir_pl.config import load_sampler
from ldir_pl.errors import ConfigError
from ldir_pl.physics import CTPhysics, VolumePhysics
from ldir_pl.sampling import GuidedDDIM, PseudoInverse
from ldir_pl.sampling.chunk_size import chunk_for_memory
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.refine import AnchoredTV
from ldir_pl.sampling.tv import TVReconstructor

CONF = Path(__file__).resolve().parents[1] / "conf"
# small and plain: 4 steps from noise, no warm start, no final steps, no refinement
BASE = {"num_steps": 4, "lr": 0.05, "refine": "none", "warm_start": None, "final_steps": 0, "progress": False}


FLAT = {"lr": "guidance.step_size.lr", "step_schedule": "guidance.step_size.schedule", "grad_wrt": "guidance.wrt",
        "guidance_every": "guidance.every", "final_steps": "guidance.final_steps", "final_lr": "guidance.final_lr",
        "warm_start_strength": "init.strength", "clamp_z0": "clip_sample", "tv_iters": "tv.max_iterations"}


def make(bundle, name: str = "ldir", **kw) -> GuidedDDIM:
    """``conf/sampler/<name>.yaml`` with the settings as keyword arguments (flat names for nested parts)."""
    overrides = []
    for k, v in {**BASE, **kw}.items():
        if k == "optimizer":
            overrides.append(f"sampler/guidance/update={v}")
        elif k == "refine":
            overrides.append("refine=null" if v == "none" else "tv.max_iterations=20")
        elif k == "warm_start":
            overrides.append("init=null" if v is None else ("init.source=${tv}" if v == "tv" else "init.strength=0.3"))
        else:
            overrides.append(f"{FLAT.get(k, k)}={'null' if v is None else v}")
    return load_sampler(name, prior=bundle, overrides=overrides)


def test_shapes_range_finite_and_determinism(latent_bundle, ct_physics):
    x = phantom(3)
    ids = ["a", "b", "c"]
    y = ct_physics.measure(x, ids)
    s = make(latent_bundle)
    out = s.reconstruct(y, ct_physics, ids)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    again = s.reconstruct(y, ct_physics, ids)
    assert torch.equal(out, again)
    # reversed batch order: each image gets the same result
    rev = s.reconstruct(y.flip(0), ct_physics, ids[::-1]).flip(0)
    assert torch.allclose(out, rev, atol=1e-5)
    # a single image reconstructed alone matches its batched result
    single = s.reconstruct(y[1:2], ct_physics, ids[1:2])
    assert torch.allclose(out[1:2], single, atol=1e-5)


def test_eta_one_is_seeded_per_image(latent_bundle, ct_physics):
    x = phantom(2)
    y = ct_physics.measure(x, [0, 1])
    s = make(latent_bundle, eta=1.0, optimizer="momentum")
    a = s.reconstruct(y, ct_physics, [0, 1])
    b = s.reconstruct(y.flip(0), ct_physics, [1, 0]).flip(0)
    assert torch.allclose(a, b, atol=1e-5)
    c = s.reconstruct(y, ct_physics, [5, 6])
    assert not torch.allclose(a, c)


def test_runs_with_grad_under_inference_mode(latent_bundle, ct_physics):
    x = phantom(2)
    with torch.inference_mode():
        y = ct_physics.measure(x, [0, 1])
        out = make(latent_bundle, refine="tv").reconstruct(y, ct_physics, [0, 1])
    assert torch.isfinite(out).all()
    with torch.no_grad():
        out2 = make(latent_bundle, refine="tv").reconstruct(y, ct_physics, [0, 1])
    assert torch.allclose(out, out2)


def _count_unet_backward(latent_bundle, ct_physics, grad_wrt, every=1):
    calls = []
    handle = latent_bundle.unet.conv_out.register_full_backward_hook(lambda *a: calls.append(1))
    try:
        y = ct_physics.measure(phantom(1), [0])
        make(latent_bundle, grad_wrt=grad_wrt, num_steps=3, guidance_every=every).reconstruct(y, ct_physics, [0])
    finally:
        handle.remove()
    return len(calls)


def test_z0_switch_skips_unet_backward(latent_bundle, ct_physics):
    assert _count_unet_backward(latent_bundle, ct_physics, "zt") == 3
    assert _count_unet_backward(latent_bundle, ct_physics, "z0") == 0
    assert _count_unet_backward(latent_bundle, ct_physics, "zt", every=2) == 2  # steps 0 and 2 (the last) guided


@pytest.mark.parametrize("optimizer,grad_wrt,lr", [("adam", "zt", 1.0), ("sgd", "z0", 1e4), ("momentum", "z0", 3e3)])
def test_guidance_reduces_data_misfit(latent_bundle, ct_physics, optimizer, grad_wrt, lr):
    # measurements of images the (random) decoder can produce, so the data are reachable from the latent
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = (latent_bundle.vae.decode(6 * torch.randn(2, *latent_bundle.latent_shape, generator=gen)).sample + 1) / 2
    y = ct_physics.measure(x, [0, 1])
    fid = DataFidelity(2, squared=True)
    free = make(latent_bundle, lr=0.0, num_steps=10).reconstruct(y, ct_physics, [0, 1])
    guided = make(latent_bundle, lr=lr, num_steps=10, optimizer=optimizer, grad_wrt=grad_wrt).reconstruct(
        y, ct_physics, [0, 1])
    assert (fid(y, ct_physics.A(guided)) < 0.5 * fid(y, ct_physics.A(free))).all()


def test_v_prediction_and_clamp(ct_physics):
    b = tiny_latent_bundle(prediction_type="v_prediction")
    y = ct_physics.measure(phantom(1), [0])
    out = make(b, clamp_z0=2.0, step_schedule="sqrt_one_minus_alpha_bar").reconstruct(y, ct_physics, [0])
    assert torch.isfinite(out).all() and out.shape == (1, 1, SIZE, SIZE)


def test_clear_errors(latent_bundle, ct_physics, tmp_path):
    big = CTPhysics(beam="parallel", num_views=8, image_size=2 * SIZE, noise=NOISE)
    y = big.measure(phantom(1, 2 * SIZE), [0])
    with pytest.raises(ValueError, match=r"32x32.*64x64"):
        make(latent_bundle).reconstruct(y, big, [0])
    y = ct_physics.measure(phantom(1), [0])
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make(latent_bundle).reconstruct(y, ct_physics, [0])
    missing = tmp_path / "no_such_prior"
    with pytest.raises(FileNotFoundError, match="no_such_prior"):
        load_sampler("ldir", prior=str(missing))
    with pytest.raises(MissingConfigException, match="lbfgs"):
        make(latent_bundle, optimizer="lbfgs")
    with pytest.raises(ValueError, match="ids"):
        make(latent_bundle).reconstruct(ct_physics.measure(phantom(2), [0, 1]), ct_physics, [0])


def test_fidelity_norms():
    y, ax = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert DataFidelity(2, True)(y, ax).item() == pytest.approx(25.0)
    assert DataFidelity(2, False)(y, ax).item() == pytest.approx(5.0)
    assert DataFidelity(1)(y, ax).item() == pytest.approx(7.0)
    assert DataFidelity(2, True, normalize=True)(y, ax).item() == pytest.approx(25.0 / 9.0)
    with pytest.raises(ValueError):
        DataFidelity(3)


def test_saved_bundle_and_hydra_configs(latent_bundle, ct_physics, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldir_pl.models.bundle import save_prior

    path = save_prior(tmp_path / "prior", latent_bundle.vae, latent_bundle.unet, latent_bundle.scheduler,
                      {"image_size": SIZE, "scaling_factor": 0.5})
    assert json.loads((path / "ldir_prior.json").read_text())["kind"] == "latent"
    y = ct_physics.measure(phantom(1), [0])
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name, expect in [("ldir", ("Adam", "zt", 1, "fbp")), ("latent_dps", ("SGD", "zt", 1, "fbp")),
                             ("ldir_z0", ("Adam", "z0", 1, "fbp")), ("ldir_mean", ("Adam", "zt", 4, "fbp")),
                             ("ldir_tv", ("Adam", "zt", 1, "tv")), ("ldir_paper", ("Adam", "zt", 1, None))]:
            cfg = compose("reconstruct", overrides=[f"sampler={name}", f"prior.path={path}", "seed=3",
                                                    "sampler.guidance.final_steps=2", "sampler.num_steps=2",
                                                    "sampler.progress=false", "data.image_size=32"])
            s = instantiate(cfg.sampler)
            assert isinstance(s, GuidedDDIM) and s.name == name and s.seed == 3
            source = None if s.init is None else s.init.source.name
            assert (type(s.guidance.update).__name__, s.guidance.wrt, s.num_samples, source) == expect
            out = s.reconstruct(y, ct_physics, [0])
            assert out.shape == (1, 1, SIZE, SIZE) and torch.isfinite(out).all()


def _unet_inputs(sampler):
    """Record (z, t) of every UNet call."""
    seen = []
    handle = sampler.prior.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach().clone(),
                                                                                       int(args[1]))))
    return seen, handle


def test_warm_start_plan_is_img2img_slicing_and_final_iterations(latent_bundle, ct_physics):
    from diffusers import DDIMScheduler

    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        x = (latent_bundle.vae.decode(6 * torch.randn(2, *latent_bundle.latent_shape, generator=gen)).sample + 1) / 2
    y = ct_physics.measure(x, [0, 1])
    fid = DataFidelity(2, squared=True)
    s = make(latent_bundle, warm_start="pinv", warm_start_strength=0.4, num_steps=4, grad_wrt="z0")
    # the plan: the last num_steps steps of a num_steps / strength = 10-step DDIM plan (diffusers' img2img)
    ref = DDIMScheduler.from_config(latent_bundle.scheduler.config, timestep_spacing="trailing")
    ref.set_timesteps(10)
    plan = ref.timesteps[6:]
    assert s.timesteps().tolist() == plan.tolist()
    seen, handle = _unet_inputs(s)
    try:
        out = s.reconstruct(y, ct_physics, [0, 1])
    finally:
        handle.remove()
    assert [t for _, t in seen] == plan.tolist() and torch.isfinite(out).all()
    # the first latent is the encoded FBP image noised to the plan's first timestep by the scheduler
    noise, _ = s.initial_noise([0, 1])
    fbp = PseudoInverse("fbp").reconstruct(y, ct_physics, [0, 1])
    with torch.no_grad():
        want = ref.add_noise(latent_bundle.encode(fbp), noise, plan[:1])
    assert torch.allclose(seen[0][0], want, atol=1e-5)
    # without a warm start the plan is the scheduler's own from T
    ref.set_timesteps(5)
    assert make(latent_bundle, num_steps=5).timesteps().tolist() == ref.timesteps.tolist()
    # final iterations: history-gradient steps on the clean latent after DDIM lower the misfit further
    base = make(latent_bundle, lr=1.0, num_steps=4, grad_wrt="z0")
    more = make(latent_bundle, lr=1.0, num_steps=4, grad_wrt="z0", final_steps=6, final_lr=0.3)
    r0, r1 = base.reconstruct(y, ct_physics, [0, 1]), more.reconstruct(y, ct_physics, [0, 1])
    assert len(more.sample(y, ct_physics, [0, 1]).losses) == 4 + 6
    assert (fid(y, ct_physics.A(r1)) < fid(y, ct_physics.A(r0))).all()
    with pytest.raises((ValueError, InstantiationException), match="init.strength=0.0"):
        make(latent_bundle, warm_start="pinv", warm_start_strength=0.0)
    with pytest.raises((ValueError, InstantiationException), match="final_steps=-1"):
        make(latent_bundle, final_steps=-1)


def test_warm_start_from_tv_runs_tv_once_per_measurement(latent_bundle, ct_physics):
    x = phantom(2)
    y = ct_physics.measure(x, [0, 1])
    s = make(latent_bundle, warm_start="tv", warm_start_strength=0.05, num_steps=2, grad_wrt="z0", num_samples=2)
    assert isinstance(s.init.source, TVReconstructor)
    tv, fbp = s.init.source.reconstruct(y, ct_physics), PseudoInverse("pinv").reconstruct(y, ct_physics, [0, 1])
    assert torch.allclose(s.init.image(y, ct_physics, [0, 1]), tv, atol=1e-6)
    assert (tv - fbp).abs().max() > 1e-2
    calls = []
    orig = s.init.source.reconstruct
    s.init.source.reconstruct = lambda *a: (calls.append(a[0].shape[0]), orig(*a))[1]
    assert torch.isfinite(s.reconstruct(y, ct_physics, [0, 1])).all()
    assert calls == [2]  # one TV image per measurement, shared by its 2 samples


def test_num_samples_averages_seeded_samples_in_chunks(latent_bundle, ct_physics):
    x = phantom(2)
    ids = ["a", "b"]
    y = ct_physics.measure(x, ids)
    s = make(latent_bundle, num_samples=3)
    avg = s.reconstruct(y, ct_physics, ids)
    with torch.enable_grad():
        singles = torch.stack([s._sample(y, ct_physics, [s.sample_id(i, k) for i in ids], None)[0] for k in range(3)])
    assert not torch.allclose(singles[0], singles[1])  # different noise per sample
    assert torch.allclose(avg, singles.mean(0).clamp(0, 1), atol=1e-5)
    # sample 0 carries the image's own seed: K = 1 is the single-sample sampler
    assert torch.allclose(make(latent_bundle).reconstruct(y, ct_physics, ids), singles[0].clamp(0, 1), atol=1e-6)
    # chunking the 6 latents two at a time (samples of one image split over chunks) changes nothing
    chunked = make(latent_bundle, num_samples=3, batch_size=2).reconstruct(y, ct_physics, ids)
    assert torch.allclose(avg, chunked, atol=1e-5)
    with pytest.raises((ValueError, InstantiationException), match="num_samples=0"):
        make(latent_bundle, num_samples=0)


def test_tv_refinement_is_anchored_tv(ct_physics):
    x = phantom(2)
    y = ct_physics.measure(x, [0, 1])
    anchor = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    tv = TVReconstructor(weight=3e-5, max_iterations=3000, tol=1e-6)
    # no pull: the TV problem itself, so from the anchor PDHG reaches the TV baseline's minimiser
    free = AnchoredTV(tv, lam=0.0)(anchor, y, ct_physics)
    assert (free - tv.reconstruct(y, ct_physics)).abs().max() < 2e-3
    # a heavy pull keeps the image; a light one moves it towards the data
    held = AnchoredTV(tv, lam=1e3)(anchor, y, ct_physics)
    assert (held - anchor).abs().max() < 1e-2
    res = {lam: float((ct_physics.A(AnchoredTV(tv, lam)(anchor, y, ct_physics)) - y).norm()) for lam in (0.0, 0.05, 1e3)}
    assert res[0.0] < res[0.05] < res[1e3]
    assert free.min() >= 0 and free.max() <= 1


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sampler").glob("*.yaml")))
def test_every_sampler_config_builds_and_python_defaults_equal_the_yaml(name, latent_bundle, ct_physics):
    from hydra import compose, initialize_config_dir
    from tiny import tiny_pixel_bundle

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("reconstruct", [f"sampler={name}"])
    text = (CONF / "sampler" / f"{name}.yaml").read_text()
    if "defaults:\n  - guidance/update" in text or "defaults:" not in text:  # a root config: where defaults live
        mismatched = [(t, k, v, d) for t, k, v, d in target_defaults(cfg.sampler) if v != d]
        assert not mismatched, mismatched
    s = load_sampler(name, prior=tiny_pixel_bundle() if name == "pixel_dps" else latent_bundle,
                     overrides=["tv.max_iterations=20"]
                     + (["num_steps=2", "progress=false"] if "prior" in cfg.sampler else []))
    assert s.name == cfg.sampler.get("name", name)
    volume = VolumePhysics(ct_physics, z_ratio=0.5)  # a 2-slice volume: slice-wise methods run on it unchanged
    y = volume.measure(phantom(2), ["v/0", "v/1"])
    assert s.reconstruct(y, volume, ["v/0", "v/1"]).shape == (2, 1, SIZE, SIZE)


def test_bf16_sampler_stays_close_to_fp32_and_keeps_fp32_state():
    """``precision=bf16`` runs the networks under autocast; latents, the data term and the result stay fp32 and the
    image moves little (a trained prior on a GPU is held to 0.05 dB by ``make gpu-check``'s sampler figures)."""
    physics = CTPhysics(num_views=8, image_size=32, noise=NOISE)
    x = phantom(2)
    y = physics.measure(x, [0, 1])
    args = ["num_steps=4", "guidance.final_steps=2", "tv.max_iterations=20", "progress=false"]
    ref = load_sampler("ldir", tiny_latent_bundle(), args).reconstruct(y, physics, [0, 1])
    low = load_sampler("ldir", tiny_latent_bundle(), [*args, "precision=bf16"])
    out = low.sample(y, physics, [0, 1])
    assert out.images.dtype == torch.float32 and all(loss.dtype == torch.float32 for loss in out.losses)
    got = low.reconstruct(y, physics, [0, 1])
    assert got.dtype == torch.float32 and float((got - ref).abs().mean()) < 0.02
    with pytest.raises(ValueError, match="sampler.precision"):
        load_sampler("ldir", tiny_latent_bundle(), [*args, "precision=fp8"])


def test_chunk_for_memory_follows_the_linear_model():
    """``batch_size=auto``: from the peaks of 1 and 2 latents, the largest chunk that fits 80% of free memory."""
    gib = 1 << 30
    peaks = (3 * gib + gib // 2, 4 * gib)  # 3 GiB fixed + 0.5 GiB per latent
    assert chunk_for_memory(*peaks, free_bytes=10 * gib, n=100) == 10  # (8 - 3) / 0.5
    assert chunk_for_memory(*peaks, free_bytes=100 * gib, n=7) == 7
    assert chunk_for_memory(*peaks, free_bytes=10_000 * gib, n=1000) == 256
    with pytest.raises(ConfigError, match=r"one latent needs about 3.50 GiB but 4.00 GiB"):
        chunk_for_memory(*peaks, free_bytes=4 * gib, n=4)
    assert chunk_for_memory(*peaks, free_bytes=1, n=1) == 1  # one latent is one chunk, whatever memory says


def test_batch_size_setting_is_checked():
    args = ["num_steps=2", "guidance.final_steps=1", "progress=false"]
    with pytest.raises(ConfigError, match="sampler.batch_size='abc'"):
        load_sampler("ldir", tiny_latent_bundle(), [*args, "batch_size=abc"])
    assert load_sampler("ldir", tiny_latent_bundle(), [*args, "batch_size=0"]).batch_size is None
