"""The CUDA paths, each test run on the CPU too: on a GPU machine (``make gpu-check``) the ``cuda`` variants
run, elsewhere they skip and the CPU variants keep the same code paths tested, so a GPU run can only
fail for GPU reasons."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from odl.applications import tomo
from test_vae import smooth_images
from tiny import NOISE, phantom, tiny_latent_bundle, tiny_module
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import BatchSizeLRSearch, SwapOutCallback
from ldir_pl.config import load_sampler
from ldir_pl.metrics import image_metrics
from ldir_pl.physics import CTPhysics, GaussianNoise
from ldir_pl.physics.ray_transform import RayTransform

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _trainer(device: str, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_operator_on_device_matches_odl(device):
    physics = CTPhysics(num_views=30, image_size=64, noise=GaussianNoise(relative=0.01))
    impl = "astra_cuda" if device == "cuda" and tomo.ASTRA_CUDA_AVAILABLE else "astra_cpu"
    odl_op = RayTransform(physics.geometry, backend="odl", impl=impl)
    x = phantom(2, 64)
    y = torch.rand(2, 1, *physics.meas_shape, generator=torch.Generator().manual_seed(0))
    physics.to(device)
    ax, aty = physics.A(x.to(device)).cpu(), physics.A_adjoint(y.to(device)).cpu()
    # the forward matches ODL's projector on the device (astra_cuda there); the adjoint is the exact transpose of
    # the matrix, i.e. ODL's CPU backprojector: astra's CUDA backprojector is a different discretisation (~1%)
    assert torch.allclose(ax, odl_op(x), rtol=1e-3, atol=1e-3 * float(ax.abs().max()))
    odl_cpu = RayTransform(physics.geometry, backend="odl", impl="astra_cpu")
    assert torch.allclose(aty, odl_cpu.adjoint(y), rtol=1e-3, atol=1e-3 * float(aty.abs().max()))
    assert torch.allclose((ax * y).sum(), (x * aty).sum(), rtol=1e-4)  # <Ax, y> = <x, A^T y> in the plain sums
    cpu = CTPhysics(num_views=30, image_size=64, noise=NOISE)
    assert torch.allclose(ax, cpu.A(x), rtol=1e-5, atol=1e-5 * float(ax.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_ldir_on_device_matches_cpu(device):
    physics = CTPhysics(num_views=8, image_size=32, noise=GaussianNoise(relative=0.01))
    x = phantom(2)
    y = physics.measure(x, [0, 1])
    args = ["num_steps=4", "guidance.final_steps=2", "tv.max_iterations=20", "progress=false"]
    ref = load_sampler("ldir", tiny_latent_bundle(), args).reconstruct(y, physics, [0, 1]).cpu()
    physics.to(device)
    sampler = load_sampler("ldir", tiny_latent_bundle(), args)
    got = sampler.reconstruct(y.to(device), physics, [0, 1])
    assert got.device.type == device and sampler.device.type == device  # the sampler follows its input
    psnr_ref, psnr_got = (image_metrics(r.clamp(0, 1), x)["psnr"] for r in (ref, got.cpu()))
    assert torch.allclose(psnr_ref, psnr_got, atol=0.1)  # same noise per image on every device


class ResNet(nn.Module):
    """Residual conv net with only deterministic CUDA kernels (no adaptive pooling or interpolation)."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                          nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean(dim=(2, 3)))


class Classifier(pl.LightningModule):
    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.net = ResNet(width, blocks)
        self.grads: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).float().square().mean()

    def on_before_optimizer_step(self, optimizer):
        self.grads.append([p.grad.detach().cpu().clone() for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_out_on_device(device):
    """Bit-identical gradients, at least 2x lower peak memory at the chosen budget (CUDA), and a pinned
    buffer pool that stops growing over 20 steps."""
    width, blocks, size, batch = (64, 8, 64, 16) if device == "cuda" else (8, 2, 16, 4)
    data = DataLoader(TensorDataset(torch.randn(20 * batch, 3, size, size, generator=torch.Generator().manual_seed(0))),
                      batch_size=batch)

    def fit(swap):
        torch.manual_seed(0)
        model = Classifier(width, blocks)
        _trainer(device, max_steps=20, deterministic=True, callbacks=[swap] if swap else []).fit(model, data)
        return model

    ref = fit(None)
    probe = SwapOutCallback(memory_budget=1 << 45, profile_steps=1, max_replans=0)
    fit(probe)
    activations = probe.history[0]["baseline_resident_bytes"]
    swap = SwapOutCallback(memory_budget=int(0.1 * activations), min_bytes=1024, profile_steps=1, max_replans=0)
    got = fit(swap)
    assert len(ref.grads) == len(got.grads) == 20
    for a, b in zip(ref.grads, got.grads):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    execs = [h for h in swap.history if h["mode"] == "execute"]
    assert len(execs) >= 18 and all(h["swapped_bytes"] > 0 for h in execs)
    assert len({(h["pool_buffers"], h["pool_bytes"]) for h in execs[-10:]}) == 1  # no pinned-memory growth
    if device == "cuda":
        full = max(h["measured_peak_bytes"] for h in probe.history if h["mode"] == "execute")  # nothing swapped
        assert max(h["measured_peak_bytes"] for h in execs[2:]) * 2 <= full


class OOMAbove(pl.LightningModule):
    """Fails above ``limit`` samples: a real CUDA out-of-memory error on a GPU (the step asks for more
    than the device holds), the same exception type raised by hand on the CPU."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.batch_size, self.lr = limit, 4, 0.01
        self.net = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if x.shape[0] > self.limit:
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.empty(2 * total, dtype=torch.uint8, device=self.device)  # raises OutOfMemoryError
            raise torch.OutOfMemoryError(f"out of memory at batch {x.shape[0]} (CPU stand-in)")
        torch.randn(1, device=self.device)  # trial steps draw random numbers: the RNG must be restored
        return self.net(x).square().mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(512, 8)), batch_size=self.batch_size, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class StartState(pl.Callback):
    """Model, optimiser and RNG states at ``on_fit_start``: placed before the search it sees them as the
    search found them, placed after it as the search left them."""

    def on_fit_start(self, trainer, pl_module):
        self.params = copy.deepcopy(pl_module.state_dict())
        self.opt_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(pl_module.device) if pl_module.device.type == "cuda" else None


@pytest.mark.parametrize("device", DEVICES)
def test_batch_search_recovers_from_oom_on_device(device):
    torch.manual_seed(0)
    model = OOMAbove(limit=16)
    search = BatchSizeLRSearch(init_batch=4, max_batch=64, trial_steps=2, tolerance=0.0)
    before, after = StartState(), StartState()
    _trainer(device, max_steps=2, callbacks=[before, search, after]).fit(model)
    statuses = {t.batch: t.status for t in search.trials}
    assert statuses[32] == "oom" and search.result["batch_size"] <= 16
    assert all(torch.equal(after.params[k], v) for k, v in before.params.items())
    assert after.opt_state["state"] == before.opt_state["state"] == {} and torch.equal(after.rng, before.rng)
    assert after.opt_state["param_groups"][0]["lr"] == pytest.approx(search.result["lr"])  # only the lr moved
    if device == "cuda":
        assert torch.equal(after.cuda_rng, before.cuda_rng)
        assert torch.cuda.memory_allocated() < 1 << 30  # the failed allocation left nothing behind


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_of_vae_and_unet(device, tmp_path):
    data = DataLoader(smooth_images(16), batch_size=8)
    vae = tiny_module("vae")
    trainer = _trainer(device, max_steps=3, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(vae, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    ldm = tiny_module("ldm", vae_path=str(vae.export(tmp_path / "vae")), scheduler={"num_train_timesteps": 100})
    trainer = _trainer(device, max_steps=3, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(ldm, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_auto_chunks_fit_free_memory_and_keep_the_result(device):
    """``batch_size=auto`` (the CUDA default): chunks sized by free GPU memory give the image of one latent at a
    time; on a CPU it is refused with the setting named."""
    physics = CTPhysics(num_views=8, image_size=32, noise=GaussianNoise(relative=0.01)).to(device)
    x = phantom(3).to(device)
    y = physics.measure(x, [0, 1, 2])
    args = ["num_steps=3", "guidance.final_steps=1", "tv.max_iterations=10", "progress=false"]
    auto = load_sampler("ldir", tiny_latent_bundle(), [*args, "batch_size=auto"])
    if device == "cpu":
        with pytest.raises(ValueError, match="batch_size=auto sizes chunks by free GPU memory"):
            auto.reconstruct(y, physics, [0, 1, 2])
        return
    got = auto.reconstruct(y, physics, [0, 1, 2])
    one, two = auto._probed[torch.device(device, torch.cuda.current_device())]
    assert two > one > 0  # the probes measured a step whose memory grows with the chunk
    ref = load_sampler("ldir", tiny_latent_bundle(), [*args, "batch_size=1"]).reconstruct(y, physics, [0, 1, 2])
    assert torch.allclose(got, ref, atol=1e-4)
