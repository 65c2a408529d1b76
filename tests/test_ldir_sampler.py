"""The guided-DDIM sampler (LDIR and its variants) with tiny real diffusers models and a real 32x32 CT physics."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from tiny import SIZE, phantom, tiny_latent_bundle

from ldir_pl.physics import CTPhysics
from ldir_pl.sampling import GuidedDDIM, PseudoInverse, load_sampler
from ldir_pl.sampling.fidelity import DataFidelity
from ldir_pl.sampling.refine import operator_norm_sq, refine
from ldir_pl.sampling.tv import TVReconstructor

CONF = Path(__file__).resolve().parents[1] / "conf"
# small and plain: 4 steps from noise, no warm start, no final steps, no refinement
BASE = {"num_steps": 4, "lr": 0.05, "refine": "none", "warm_start": None, "final_steps": 0, "progress": False}


def make(bundle, name: str = "ldir", **kw) -> GuidedDDIM:
    """``conf/sampler/<name>.yaml`` with the settings as keyword arguments (flat names for nested parts)."""
    overrides = []
    for k, v in {**BASE, **kw}.items():
        if k == "lr":
            overrides.append(f"step_size.lr={v}")
        elif k == "step_schedule":
            overrides.append(f"step_size.schedule={v}")
        elif k == "optimizer":
            overrides.append(f"sampler/update={v}")
        elif k == "refine":
            overrides.append("refine=null" if v == "none" else f"refine.method={v}")
        elif k == "refine_iters":
            overrides.append(f"refine.iters={v}")
        elif k == "warm_start":
            overrides.append("init=null" if v is None else f"init.source={v}")
        elif k == "warm_start_strength":
            overrides.append(f"init.strength={v}")
        else:
            overrides.append(f"{k}={'null' if v is None else v}")
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
        out = make(latent_bundle, refine="cg", refine_iters=3).reconstruct(y, ct_physics, [0, 1])
    assert torch.isfinite(out).all()
    with torch.no_grad():
        out2 = make(latent_bundle, refine="cg", refine_iters=3).reconstruct(y, ct_physics, [0, 1])
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
    big = CTPhysics(kind="parallel", num_views=8, image_size=2 * SIZE)
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


def test_refine_reduces_residual_and_prox_limits_change(ct_physics):
    x = phantom(2)
    y = ct_physics.measure(x, [0, 1])
    x0 = torch.full_like(x, 0.2)
    assert operator_norm_sq(ct_physics) > 0
    for method in ("cg", "gd"):
        out = refine(x0, y, ct_physics, method=method, iters=10)
        assert out.min() >= 0 and out.max() <= 1
        before = (ct_physics.A(x0) - y).norm()
        assert (ct_physics.A(out) - y).norm() < 0.5 * before
    near = refine(x0, y, ct_physics, method="cg", iters=10, lam_rel=100.0)
    far = refine(x0, y, ct_physics, method="cg", iters=10, lam_rel=0.0)
    assert (near - x0).norm() < 0.1 * (far - x0).norm()
    assert torch.equal(refine(x0, y, ct_physics, method="none"), x0)


def test_saved_bundle_and_hydra_configs(latent_bundle, ct_physics, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldir_pl.models.bundle import save_prior

    path = save_prior(tmp_path / "prior", latent_bundle.vae, latent_bundle.unet, latent_bundle.scheduler,
                      {"image_size": SIZE, "scaling_factor": 0.5})
    assert json.loads((path / "ldir_prior.json").read_text())["kind"] == "latent"
    y = ct_physics.measure(phantom(1), [0])
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name, expect in [("ldir", ("Adam", "zt", 1, "pinv")), ("latent_dps", ("SGD", "zt", 1, "pinv")),
                             ("ldir_z0", ("Adam", "z0", 1, "pinv")), ("ldir_mean", ("Adam", "zt", 4, "pinv")),
                             ("ldir_tv", ("Adam", "zt", 1, "tv")), ("ldir_paper", ("Adam", "zt", 1, None))]:
            cfg = compose(overrides=[f"+sampler={name}", f"+prior.path={path}", "+seed=3", "sampler.final_steps=2",
                                     "sampler.num_steps=2", "sampler.progress=false"])
            s = instantiate(cfg.sampler)
            assert isinstance(s, GuidedDDIM) and s.name == name and s.seed == 3
            source = None if s.init is None else s.init.source
            assert (type(s.update).__name__, s.grad_wrt, s.num_samples, source) == expect
            out = s.reconstruct(y, ct_physics, [0])
            assert out.shape == (1, 1, SIZE, SIZE) and torch.isfinite(out).all()


def test_warm_start_from_fbp_and_final_iterations(latent_bundle, ct_physics):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        x = (latent_bundle.vae.decode(6 * torch.randn(2, *latent_bundle.latent_shape, generator=gen)).sample + 1) / 2
    y = ct_physics.measure(x, [0, 1])
    fid = DataFidelity(2, squared=True)
    # warm start: sampling begins at strength * T from the encoded FBP image, with num_steps steps
    seen = []
    s = make(latent_bundle, warm_start="pinv", warm_start_strength=0.4, num_steps=4, grad_wrt="z0")
    orig = s._predict
    s._predict = lambda z, t, a: (seen.append(t), orig(z, t, a))[1]
    out = s.reconstruct(y, ct_physics, [0, 1])
    assert len(seen) == 4 and seen[0] == round(0.4 * 999) and seen == sorted(seen, reverse=True)
    assert torch.isfinite(out).all()
    # final iterations: history-gradient steps on the clean latent after DDIM lower the misfit further
    base = make(latent_bundle, lr=1.0, num_steps=4, grad_wrt="z0")
    more = make(latent_bundle, lr=1.0, num_steps=4, grad_wrt="z0", final_steps=6, final_lr=0.3)
    r0, r1 = base.reconstruct(y, ct_physics, [0, 1]), more.reconstruct(y, ct_physics, [0, 1])
    assert len(more.last_losses) == 4 + 6
    assert (fid(y, ct_physics.A(r1)) < fid(y, ct_physics.A(r0))).all()
    with pytest.raises((ValueError, InstantiationException), match="init.source='art'"):
        make(latent_bundle, warm_start="art")
    with pytest.raises((ValueError, InstantiationException), match="init.strength=0.0"):
        make(latent_bundle, warm_start="pinv", warm_start_strength=0.0)
    with pytest.raises((ValueError, InstantiationException), match="final_steps=-1"):
        make(latent_bundle, final_steps=-1)


def test_warm_start_from_tv_encodes_the_tv_image_once_per_measurement(latent_bundle, ct_physics):
    x = phantom(2)
    y = ct_physics.measure(x, [0, 1])
    s = make(latent_bundle, warm_start="tv", warm_start_strength=0.05, num_steps=2, grad_wrt="z0", num_samples=2)
    tv, fbp = TVReconstructor().reconstruct(y, ct_physics, [0, 1]), PseudoInverse("pinv").reconstruct(y, ct_physics, [0, 1])
    assert torch.allclose(s.init.image(y, ct_physics, [0, 1]), tv, atol=1e-6)
    assert (tv - fbp).abs().max() > 1e-2
    # the sampler starts from sqrt(a0) E(x_tv) + sqrt(1 - a0) n, with the TV image computed once per measurement
    calls, starts = [], []
    orig_recon, orig_predict = s.init._recon.reconstruct, s._predict
    s.init._recon.reconstruct = lambda *a: (calls.append(a[0].shape[0]), orig_recon(*a))[1]
    s._predict = lambda z, t, a: (starts.append((z.detach().clone(), a)) if not starts else None, orig_predict(z, t, a))[1]
    out = s.reconstruct(y, ct_physics, [0, 1])
    assert calls == [2] and torch.isfinite(out).all()
    z_start, a0 = starts[0]
    noise, _ = s.initial_noise([s.sample_id(i, k) for i in (0, 1) for k in range(2)])
    with torch.no_grad():
        want = math.sqrt(a0) * s.encode(tv.repeat_interleave(2, dim=0)) + math.sqrt(1 - a0) * noise
    assert torch.allclose(z_start, want, atol=1e-5)


def test_num_samples_averages_seeded_samples_in_chunks(latent_bundle, ct_physics):
    x = phantom(2)
    ids = ["a", "b"]
    y = ct_physics.measure(x, ids)
    s = make(latent_bundle, num_samples=3)
    avg = s.reconstruct(y, ct_physics, ids)
    with torch.enable_grad():
        singles = torch.stack([s._sample(y, ct_physics, [s.sample_id(i, k) for i in ids], None) for k in range(3)])
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
    tv = TVReconstructor(weight=3e-5, iterations=60)
    # no anchor weight: the TV problem itself, started from the given image
    free = refine(anchor, y, ct_physics, method="tv", iters=60, lam_rel=0.0, tv_weight=3e-5)
    assert torch.allclose(free, tv._torch(y, anchor, ct_physics).clamp(0, 1), atol=1e-6)
    # a heavy anchor keeps the image; a light one moves it towards the data
    held = refine(anchor, y, ct_physics, method="tv", iters=60, lam_rel=1e3)
    assert (held - anchor).abs().max() < 1e-2
    res = {lam: float((ct_physics.A(refine(anchor, y, ct_physics, method="tv", iters=60, lam_rel=lam)) - y).norm())
           for lam in (0.0, 0.05, 1e3)}
    assert res[0.0] < res[0.05] < res[1e3]
    assert free.min() >= 0 and free.max() <= 1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_is_diffusers_step_and_why_the_loop_keeps_its_own(latent_bundle, eta):
    """On a scheduler's own timesteps ``ddim_step`` is ``DDIMScheduler.step``; a warm start samples from t0 < T,
    where ``step()`` would go to t - T / num_steps instead of the schedule's next timestep."""
    from diffusers import DDIMScheduler

    from ldir_pl.sampling.guided_ddim import ddim_sigma, ddim_step

    sched = DDIMScheduler.from_config(latent_bundle.scheduler.config, clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]
    gen = torch.Generator().manual_seed(0)
    z, eps, noise = (torch.randn(2, 4, 16, 16, generator=gen) for _ in range(3))
    for i, t in enumerate(ts[:-1]):
        a_t, a_prev = (float(sched.alphas_cumprod[s]) for s in (t, ts[i + 1]))
        z0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        ref = sched.step(eps, t, z, eta=eta, variance_noise=noise)
        sigma = ddim_sigma(eta, a_t, a_prev)
        assert torch.allclose(ddim_step(z0, eps, a_prev, sigma, noise), ref.prev_sample, atol=1e-5)
        assert torch.allclose(z0, ref.pred_original_sample, rtol=1e-5, atol=1e-4)
    s = make(latent_bundle, warm_start="pinv", warm_start_strength=0.3, num_steps=10)
    warm = s.timesteps()
    assert warm[0] == round(0.3 * 999) and warm[1] != warm[0] - 1000 // 10  # step() would jump past t0's grid


def _target_defaults(node) -> list[tuple[str, str, object, object]]:
    """(target, key, YAML value, Python default) for every key a ``_target_`` node sets that has a default."""
    import importlib
    import inspect

    from omegaconf import DictConfig

    out = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            mod, _, cls = node._target_.rpartition(".")
            params = inspect.signature(getattr(importlib.import_module(mod), cls)).parameters
            for key, p in params.items():
                if key in node and p.default is not inspect.Parameter.empty and not isinstance(node[key], DictConfig):
                    out.append((node._target_, key, node[key], p.default))
        for value in node.values():
            out += _target_defaults(value)
    return out


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sampler").glob("*.yaml")))
def test_every_sampler_config_builds_and_python_defaults_equal_the_yaml(name, latent_bundle, ct_physics):
    from hydra import compose, initialize_config_dir
    from tiny import tiny_pixel_bundle

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("reconstruct", [f"sampler={name}"])
    text = (CONF / "sampler" / f"{name}.yaml").read_text()
    if "defaults:\n  - update" in text or "defaults:" not in text:  # a root config: where defaults live
        mismatched = [(t, k, v, d) for t, k, v, d in _target_defaults(cfg.sampler) if v != d]
        assert not mismatched, mismatched
    s = load_sampler(name, prior=tiny_pixel_bundle() if name == "pixel_dps" else latent_bundle,
                     overrides=["num_steps=2", "progress=false"] if "prior" in cfg.sampler else [])
    assert s.name == cfg.sampler.get("name", name)
    y = ct_physics.measure(phantom(1), [0])
    assert s.reconstruct(y, ct_physics, [0]).shape == (1, 1, SIZE, SIZE)
