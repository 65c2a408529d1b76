"""Time and peak memory per image: LDIR (the default ``sampler=ldir``) vs pixel-space DPS (``sampler=pixel_dps``),
each at its own defaults, then LDIR at several DDIM step counts.

LDIR runs the packaged prior (or random networks of its shapes with ``--random``); pixel DPS runs a random pixel
UNet of the latent UNet's widths (timing does not depend on the weights). Each configuration runs in a fresh
subprocess. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before sampling, models excluded);
on CPU the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs where the kernel
allows, else ru_maxrss) minus the RSS just before sampling, i.e. the extra memory sampling needs on top of the
loaded models.

    python experiments/bench_sampler.py                          # CPU: a few minutes
    python experiments/bench_sampler.py --device cuda --batch 8 --ldir-steps 20 50 100

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def packaged_or_random(random: bool):
    """The packaged CT prior, or (``random``) networks of its shapes with fresh weights."""
    import torch

    from ldir_pl.models.bundle import PriorBundle
    from ldir_pl.priors import packaged_prior

    bundle = PriorBundle.from_pretrained(packaged_prior("ct256"))
    if random:
        for net in (bundle.unet, bundle.vae):
            for p in net.parameters():
                torch.nn.init.normal_(p, std=0.02)
    return bundle


def run_one(args: argparse.Namespace) -> dict:
    """Child process: build models, sample once (warm-up excluded when --warmup), report."""
    import torch
    from diffusers import DDPMScheduler

    from ldir_pl.config import load_sampler
    from ldir_pl.models.bundle import PriorBundle
    from ldir_pl.models.latent_diffusion import build_unet
    from ldir_pl.physics import CTPhysics, GaussianNoise

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    latent = packaged_or_random(args.random)
    size = latent.image_size
    steps = ([] if args.steps is None else [f"num_steps={args.steps}"]) + list(args.overrides)
    if args.method == "pixel_dps":
        widths = list(latent.unet.config.block_out_channels)
        unet = build_unet(size, 1, widths, layers_per_block=latent.unet.config.layers_per_block,
                          attention_levels=[len(widths) - 2, len(widths) - 1], norm_num_groups=min(32, widths[0]))
        sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
        bundle = PriorBundle(unet, sched, None, 1.0, size, (1, size, size), "pixel", dict(latent.metadata))
        config = ("pixel_dps", [*steps, "progress=false"])
    else:
        bundle = latent
        config = ("ldir", [*steps, "progress=false"])
    sampler = load_sampler(config[0], bundle, config[1]).to(dev)
    physics = CTPhysics(beam="parallel", num_views=args.views, image_size=size, noise=GaussianNoise(relative=0.01))
    physics.to(dev)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x = (0.3 * ((xx**2 + yy**2) < 0.6)).float()[None, None].repeat(args.batch, 1, 1, 1).to(dev)
    ids = list(range(args.batch))
    y = physics.measure(x, ids)
    n_params = sum(p.numel() for p in bundle.unet.parameters())
    if args.warmup:
        load_sampler(config[0], bundle, [*config[1], "num_steps=1"]).reconstruct(y, physics, ids)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset = _reset_hwm()
        base = (_status_kb("VmRSS") or 0) * 1024
    t0 = time.perf_counter()
    sampler.reconstruct(y, physics, ids)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        how = "cuda max_memory_allocated - allocated before sampling"
    else:
        hwm = _status_kb("VmHWM")
        if reset and hwm is not None:
            peak, how = hwm * 1024 - base, "RSS high-water (VmHWM, reset) - RSS before sampling"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
            how = "ru_maxrss - RSS before sampling (includes set-up peaks)"
    return {"method": args.method, "steps": sampler.num_steps, "batch": args.batch,
            "s_per_image": dt / args.batch, "peak_mem_mb": max(0.0, peak) / 2**20 / args.batch,
            "unet_params_m": n_params / 1e6, "mem_method": how,
            "shape": list(sampler.latent_shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps for both (default: each config's own)")
    ap.add_argument("--ldir-steps", type=int, nargs="*", default=[10, 20, 50])
    ap.add_argument("--random", action="store_true", help="random weights of the packaged prior's shapes")
    ap.add_argument("--views", type=int, default=23)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="sampler overrides for every run (after --), e.g. tv.max_iterations=50")
    args = ap.parse_args()
    if args.method:  # child
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    def child(method: str, steps: int | None) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--views", str(args.views),
               "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads),
               *(["--steps", str(steps)] if steps is not None else []), *(["--random"] if args.random else []),
               *([] if args.warmup else ["--no-warmup"]), "--", *args.overrides]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"benchmark child failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
        res = json.loads(lines[-1][7:])
        print(f"{method:10s} steps={res['steps']:4d} shape={'x'.join(map(str, res['shape'])):10s} "
              f"{res['s_per_image']:9.2f} s/img  {res['peak_mem_mb']:9.1f} MB/img", flush=True)
        return res

    print(f"{args.views} views, device {args.device}, batch {args.batch}, each method at its defaults"
          + (f", {args.steps} steps" if args.steps else "") + "".join(f", {o}" for o in args.overrides))
    ldir = child("ldir", args.steps)
    dps = child("pixel_dps", args.steps)
    sweep = {s: child("ldir", s) for s in args.ldir_steps}
    summary = {
        "device": args.device, "batch": args.batch, "mem_method": ldir["mem_method"],
        "ldir_steps": ldir["steps"], "ldir_s_per_image": ldir["s_per_image"], "ldir_peak_mem_mb": ldir["peak_mem_mb"],
        "pixel_dps_steps": dps["steps"], "pixel_dps_s_per_image": dps["s_per_image"],
        "pixel_dps_peak_mem_mb": dps["peak_mem_mb"],
        "speedup_pixel_dps_over_ldir": dps["s_per_image"] / ldir["s_per_image"],
        "memory_ratio_pixel_dps_over_ldir": dps["peak_mem_mb"] / max(ldir["peak_mem_mb"], 1e-9),
        "ldir_steps_s_per_image": {str(s): r["s_per_image"] for s, r in sweep.items()},
        "ldir_steps_peak_mem_mb": {str(s): r["peak_mem_mb"] for s, r in sweep.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
