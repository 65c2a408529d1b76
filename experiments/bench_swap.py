"""Peak memory and throughput of activation-memory strategies, side by side, plus the batch-size search.

Modes per model: no offload, ``save_on_cpu`` (everything to host), activation checkpointing, the
swap-out engine with no plan (hook overhead only) and at two budgets (fractions of the model's saved
activation bytes). Models: the project's latent UNet and VAE (built here with diffusers, same shapes as
the project configs on ``--full``), and ResNet-152 (torchvision's when it imports, else a local
bottleneck ResNet-152 of the same depth/widths).

On CUDA peak memory is ``torch.cuda.max_memory_allocated``; on CPU it is the peak growth of the process
resident set during one step (a sampling thread), and "saved" is the swap engine's count of saved
activation bytes left on the device. The last line printed is one JSON object with all figures.

    python experiments/bench_swap.py --device cpu                # small sizes, ~2-4 min on 2 cores
    python experiments/bench_swap.py --device cuda --full --batch 16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from callbacks.swap_engine import SwapEngine  # noqa: E402

MB = float(1 << 20)


# ------------------------------------------------------------------------------------------- models
def latent_unet(full: bool) -> nn.Module:
    from diffusers import UNet2DModel

    ch = (128, 256, 256, 512) if full else (32, 64, 64, 128)
    return UNet2DModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=ch,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )


def vae(full: bool) -> nn.Module:
    from diffusers import AutoencoderKL

    ch = (64, 128, 256, 256) if full else (32, 32, 64, 64)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=ch,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2 if full else 1,
        norm_num_groups=32,
        sample_size=256 if full else 64,
    )


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.down(x))


def local_resnet152(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 8, 2), (256, 36, 2), (512, 3, 2)):
        stage = []
        for i in range(blocks):
            stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
        layers.append(nn.Sequential(*stage))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def resnet152() -> tuple[nn.Module, str]:
    try:
        import torchvision

        return torchvision.models.resnet152(), "resnet152(torchvision)"
    except Exception:  # noqa: BLE001 - torchvision often does not import beside a CPU torch wheel
        return local_resnet152(), "resnet152(local)"


class _Ckpt(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def with_checkpointing(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    if hasattr(m, "enable_gradient_checkpointing"):
        m.enable_gradient_checkpointing()
        return m
    targets = [
        (mod, name, child)
        for mod in m.modules()
        for name, child in mod.named_children()
        if type(child).__name__ in ("Bottleneck", "BasicBlock")
    ]
    for mod, name, child in targets:  # ResNet: checkpoint each bottleneck
        setattr(mod, name, _Ckpt(child))
    return m


def make_task(name: str, batch: int, size: int | None, full: bool, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if name == "unet":
        model = latent_unet(full)
        s = model.config.sample_size
        x = torch.randn(batch, 4, s, s, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        return model, "latent_unet", (lambda m: m(x, t).sample.float().square().mean())
    if name == "vae":
        model = vae(full)
        s = size or (256 if full else 64)
        x = torch.randn(batch, 1, s, s, generator=g).to(device)
        return model, "vae", (lambda m: (m(x).sample.float() - x).square().mean())
    model, label = resnet152()
    s = size or (224 if full else 64)
    x = torch.randn(batch, 3, s, s, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return model, label, (lambda m: nn.functional.cross_entropy(m(x).float(), y))


# ------------------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak growth of the process resident set while active (CPU stand-in for peak device memory)."""

    def __init__(self, interval: float = 2e-4) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One mode's training step (own model copy, optimizer and engine) so modes can be interleaved."""

    def __init__(self, model, loss_fn, mode, device, batch, budget=None, amp=False) -> None:
        self.model, self.loss_fn, self.mode, self.device, self.batch = model, loss_fn, mode, device, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.engine = None
        if mode.startswith("swap"):
            self.engine = SwapEngine(model, memory_budget=budget, min_bytes=1 << 16, profile_steps=1, drift_patience=10**9)
        self.amp = amp
        self.times: list[float] = []

    def step(self) -> None:
        eng = self.engine
        self.opt.zero_grad(set_to_none=True)
        if eng is not None:
            eng.step_begin(("bench", self.batch))
        ctx = (
            torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            if self.mode == "save_on_cpu"
            else contextlib.nullcontext()
        )
        dt = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        ac = torch.autocast(self.device.type, dtype=dt) if self.amp else contextlib.nullcontext()
        with ctx, ac:
            loss = self.loss_fn(self.model)
        if eng is not None:
            eng.backward_begin()
        loss.backward()
        if eng is not None:
            eng.backward_end()
            eng.step_end()
        self.opt.step()

    def timed(self) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        self.times.append(time.perf_counter() - t0)

    def memory(self) -> dict[str, float]:
        dev = self.device
        if dev.type == "cuda":
            sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            static = torch.cuda.memory_allocated(dev)
            self.step()
            sync(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            return {"peak_mb": peak / MB, "act_peak_mb": (peak - static) / MB}
        with PeakRSS() as rss:
            self.step()
        return {"peak_mb": rss.growth / MB}  # growth over weights/optimizer state already resident

    def result(self) -> dict[str, Any]:
        t = sorted(self.times)[len(self.times) // 2]  # median: robust to load bursts on shared machines
        out: dict[str, Any] = {"step_s": t, "samples_per_s": self.batch / t}
        out.update(self.memory())
        if self.engine is not None:
            h = [x for x in self.engine.history if x["mode"] == "execute"][-1]
            out.update(
                planned_saved_mb=h["planned_resident_bytes"] / MB,
                measured_saved_mb=h["measured_resident_bytes"] / MB,
                baseline_saved_mb=h["baseline_resident_bytes"] / MB,
                swapped_mb=h["swapped_bytes"] / MB,
                predicted_step_s=h["predicted_step_time"],
                measured_fwd_bwd_s=h["measured_step_time"],
                late_prefetches=h["late_prefetches"],
                hook_ms=1e3 * h["hook_seconds"],
                pool_mb=h["pool_bytes"] / MB,
            )
            self.engine.close()
        return out


def saved_bytes(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> int:
    """Saved activation bytes of one step (parameters excluded), from a profiling step."""
    eng = SwapEngine(model, memory_budget=1 << 50, profile_steps=1)
    eng.step_begin(("probe",))
    loss = loss_fn(model)
    eng.backward_begin()
    loss.backward()
    eng.backward_end()
    eng.step_end()
    n = eng.profiles[("probe",)].activation_bytes
    eng.close()
    model.zero_grad(set_to_none=True)
    return n


def bench_models(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in filter(None, args.models.split(",")):
        torch.manual_seed(0)
        model, label, loss_fn = make_task(name, args.batch, args.size, args.full, device)
        model.to(device).train()
        act = saved_bytes(model, loss_fn)
        rows: dict[str, Any] = {"saved_activation_mb": act / MB}
        modes: list[tuple[str, nn.Module, float | None]] = [
            ("none", copy.deepcopy(model), None),
            ("save_on_cpu", copy.deepcopy(model), None),
            ("checkpoint", with_checkpointing(model).to(device), None),
            ("swap_hooks_only", copy.deepcopy(model), float(1 << 50)),
        ]
        for frac in args.budgets:
            modes.append((f"swap@{frac:g}", copy.deepcopy(model), frac * act))
        runners = [Runner(m, loss_fn, mode, device, args.batch, budget, args.amp) for mode, m, budget in modes]
        try:
            for _ in range(args.warmup):
                for r in runners:
                    r.step()
            for _ in range(args.steps):  # interleaved, so a load burst hits every mode alike
                for r in runners:
                    r.timed()
            for r in runners:
                rows[r.mode] = r.result()
                print(f"  {label:24s} {r.mode:16s} {json.dumps(_round(rows[r.mode]))}", file=sys.stderr, flush=True)
        except torch.OutOfMemoryError:
            rows["oom"] = True
            torch.cuda.empty_cache()
            continue
        finally:
            del runners, modes
        base = rows["none"]
        for mode in rows:
            r = rows[mode]
            if isinstance(r, dict) and "samples_per_s" in r:
                r["throughput_vs_none"] = r["samples_per_s"] / base["samples_per_s"]
                if base.get("peak_mb"):
                    r["peak_vs_none"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
        results[label] = rows
        del model
    return results


# -------------------------------------------------------------------------------- batch-size search
def bench_search(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks import BatchSizeLRSearch

    class Data(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 1
            self.x = torch.randn(512, 3, 32, 32)

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x), batch_size=self.batch_size, shuffle=True)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lr = 1e-3
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
                nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 3, 1),
            )  # fmt: skip

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    def fit(cb: pl.Callback) -> None:
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb],
        )
        trainer.fit(Net(), datamodule=Data())

    grid = [2**k for k in range(args.search_max.bit_length()) if 2**k <= args.search_max]
    search = BatchSizeLRSearch(init_batch=1, max_batch=args.search_max, tolerance=0.05, lr_rule="sqrt", trial_steps=args.trial_steps)
    t0 = time.perf_counter()
    fit(search)
    t_search = time.perf_counter() - t0
    chosen = search.result["batch_size"]
    # brute force over the power-of-two grid plus the chosen batch (it may be a refined, off-grid one),
    # so the chosen batch is judged by the same measurement run as the best one
    brute = BatchSizeLRSearch(candidates=sorted(set(grid) | {chosen}), trial_steps=args.trial_steps, tolerance=0.0)
    t0 = time.perf_counter()
    fit(brute)
    t_brute = time.perf_counter() - t0
    table = {t.batch: t.throughput for t in brute.trials if t.status == "ok"}
    best_b = max(table, key=table.get)
    return {
        "chosen_batch": chosen,
        "chosen_lr": search.result["lr"],
        "search_table": {t.batch: round(t.throughput, 1) for t in search.trials},
        "brute_force_table": {b: round(v, 1) for b, v in table.items()},
        "brute_best_batch": best_b,
        "chosen_vs_brute_best": table[chosen] / table[best_b],
        "search_s": t_search,
        "brute_force_s": t_brute,
    }


def _round(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, float):
        return round(d, 4)
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="unet,vae,resnet152")
    p.add_argument("--batch", type=int, default=None, help="default: 4 on cpu, 32 on cuda")
    p.add_argument("--size", type=int, default=None, help="image size for vae/resnet")
    p.add_argument("--full", action="store_true", help="project-sized models (default on cuda)")
    p.add_argument("--budgets", type=float, nargs=2, default=[0.5, 0.25], help="fractions of saved activations")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--search-max", type=int, default=64)
    p.add_argument("--trial-steps", type=int, default=8)
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # fixed mmap threshold: freed tensors go back to the OS, so resident-set growth tracks live memory
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if device.type == "cuda":
        args.full = True
    if args.batch is None:
        args.batch = 32 if device.type == "cuda" else 4
    if args.threads:
        torch.set_num_threads(args.threads)

    out: dict[str, Any] = {"device": str(device), "batch": args.batch, "full": args.full, "torch": torch.__version__}
    out["models"] = bench_models(args, device)
    if not args.skip_search:
        out["batch_size_search"] = bench_search(args, device)

    hdr = f"{'model':24s} {'mode':16s} {'samples/s':>10s} {'vs none':>8s} {'peak MB':>9s} {'vs none':>8s} {'saved MB':>9s} {'swapped MB':>10s} {'late':>5s} {'hook ms':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for label, rows in out["models"].items():
        for mode, r in rows.items():
            if not isinstance(r, dict):
                continue
            if r.get("oom"):
                print(f"{label:24s} {mode:16s} {'OOM':>10s}")
                continue
            saved = r.get("measured_saved_mb", rows["saved_activation_mb"] if mode == "none" else float("nan"))
            print(
                f"{label:24s} {mode:16s} {r['samples_per_s']:10.2f} {r['throughput_vs_none']:8.3f} "
                f"{r['peak_mb']:9.1f} {r.get('peak_vs_none') or float('nan'):8.3f} {saved:9.2f} {r.get('swapped_mb', 0.0):10.2f}"
                f" {r.get('late_prefetches', '-'):>5} {r.get('hook_ms', float('nan')):8.1f}"
            )
    if "batch_size_search" in out:
        s = out["batch_size_search"]
        print(
            f"batch-size search: chose {s['chosen_batch']} (brute-force best {s['brute_best_batch']}); "
            f"throughput {100 * s['chosen_vs_brute_best']:.1f}% of brute-force best; "
            f"search {s['search_s']:.1f}s vs brute force {s['brute_force_s']:.1f}s"
        )
    print(json.dumps(_round(out)))


if __name__ == "__main__":
    main()
