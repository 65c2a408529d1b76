"""Time and peak memory per image: LDIR (latent) vs pixel-space DPS, same UNet widths, same steps.

Random-init networks (timing does not depend on the weights). LDIR runs its UNet on the VAE latent
(4 x H/f x W/f) and backpropagates through UNet + decoder (``grad_wrt=zt``, the authors' setting) and,
for reference, through the decoder only (``z0``); pixel DPS runs the same-width UNet on 1 x H x W and
backpropagates through it. Then LDIR at several step counts.

Each configuration runs in a fresh subprocess. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
(reset before sampling, models excluded); on CPU the process's resident-set high-water mark (VmHWM,
reset through /proc/self/clear_refs where the kernel allows, else ru_maxrss) minus the RSS just before
sampling, i.e. the extra memory sampling needs on top of the loaded models.

    python experiments/bench_sampler.py                          # CPU defaults: a few minutes
    python experiments/bench_sampler.py --image-size 256 --widths 64 128 128 256 --steps 50 \
        --ldir-steps 50 100 250 --device cuda

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


def run_one(args: argparse.Namespace) -> dict:
    """Child process: build models, sample once (warm-up excluded when --warmup), report."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler

    from ldir_pl.apps.sampler_configs import load_sampler
    from ldir_pl.models.bundle import PriorBundle
    from ldir_pl.models.latent_diffusion import build_unet
    from ldir_pl.physics import CTPhysics, GaussianNoise

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    size, f = args.image_size, args.factor
    widths = list(args.widths)
    attn = [len(widths) - 2, len(widths) - 1]
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    meta = {"intensity_transform": {"type": "affine", "scale": 2.0, "shift": -1.0}}
    if args.method == "pixel_dps":
        unet = build_unet(size, 1, widths, layers_per_block=args.layers, attention_levels=attn,
                          norm_num_groups=min(32, widths[0]))
        bundle = PriorBundle(unet, sched, None, 1.0, size, (1, size, size), "pixel", meta)
        config = ("pixel_dps", [f"num_steps={args.steps}", "progress=false"])
    else:
        levels = f.bit_length() - 1
        vch = [args.vae_base * min(2**i, 4) for i in range(levels + 1)]
        vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * len(vch),
                            up_block_types=["UpDecoderBlock2D"] * len(vch), block_out_channels=vch,
                            layers_per_block=1, latent_channels=4, norm_num_groups=min(32, vch[0]))
        lat = size // f
        unet = build_unet(lat, 4, widths, layers_per_block=args.layers, attention_levels=attn,
                          norm_num_groups=min(32, widths[0]))
        bundle = PriorBundle(unet, sched, vae, 1.0, size, (4, lat, lat), "latent", meta)
        # the paper's loop (noise at T, no warm start, final steps or refinement): the cost of guidance itself
        config = ("ldir_paper", [f"num_steps={args.steps}", f"guidance.wrt={args.grad_wrt}", "progress=false"])
    sampler = load_sampler(config[0], bundle, config[1]).to(dev)
    physics = CTPhysics(kind="parallel", num_views=args.views, image_size=size, noise=GaussianNoise(relative=0.01))
    physics.to(dev)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x = (0.3 * ((xx**2 + yy**2) < 0.6)).float()[None, None].repeat(args.batch, 1, 1, 1).to(dev)
    ids = list(range(args.batch))
    y = physics.measure(x, ids)
    n_params = sum(p.numel() for p in unet.parameters())
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
    return {"method": args.method, "grad_wrt": args.grad_wrt, "steps": args.steps, "batch": args.batch,
            "s_per_image": dt / args.batch, "peak_mem_mb": max(0.0, peak) / 2**20 / args.batch,
            "unet_params_m": n_params / 1e6, "mem_method": how,
            "shape": list(sampler.latent_shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--factor", type=int, default=8, help="VAE downsampling (4: 4x64x64, 8: 4x32x32 at 256)")
    ap.add_argument("--vae-base", type=int, default=32, help="VAE base width (conf/model/vae.yaml: 64)")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64, 128], help="UNet block_out_channels")
    ap.add_argument("--layers", type=int, default=1, help="UNet layers_per_block")
    ap.add_argument("--steps", type=int, default=10, help="steps for the side-by-side LDIR vs pixel DPS")
    ap.add_argument("--ldir-steps", type=int, nargs="*", default=[50, 100, 250])
    ap.add_argument("--views", type=int, default=23)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grad-wrt", default="zt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:  # child
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    def child(method: str, steps: int, grad_wrt: str = "zt") -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--steps", str(steps),
               "--grad-wrt", grad_wrt, "--image-size", str(args.image_size), "--factor", str(args.factor),
               "--vae-base", str(args.vae_base), "--widths", *map(str, args.widths), "--layers", str(args.layers),
               "--views", str(args.views), "--batch", str(args.batch), "--device", args.device,
               "--threads", str(args.threads)] + ([] if args.warmup else ["--no-warmup"])
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"benchmark child failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
        res = json.loads(lines[-1][7:])
        print(f"{method:10s} grad={grad_wrt:3s} steps={steps:4d} shape={'x'.join(map(str, res['shape'])):10s} "
              f"{res['s_per_image']:9.2f} s/img  {res['peak_mem_mb']:9.1f} MB/img", flush=True)
        return res

    print(f"image {args.image_size}^2, VAE f={args.factor}, UNet widths {args.widths}, {args.views} views, "
          f"device {args.device}, batch {args.batch}")
    ldir = child("ldir", args.steps, "zt")
    ldir_z0 = child("ldir", args.steps, "z0")
    dps = child("pixel_dps", args.steps, "zt")
    sweep = {s: child("ldir", s, "zt") for s in args.ldir_steps}
    summary = {
        "image_size": args.image_size, "factor": args.factor, "widths": args.widths, "steps": args.steps,
        "device": args.device, "mem_method": ldir["mem_method"],
        "ldir_s_per_image": ldir["s_per_image"], "ldir_peak_mem_mb": ldir["peak_mem_mb"],
        "ldir_z0_s_per_image": ldir_z0["s_per_image"], "ldir_z0_peak_mem_mb": ldir_z0["peak_mem_mb"],
        "pixel_dps_s_per_image": dps["s_per_image"], "pixel_dps_peak_mem_mb": dps["peak_mem_mb"],
        "speedup_pixel_dps_over_ldir": dps["s_per_image"] / ldir["s_per_image"],
        "memory_ratio_pixel_dps_over_ldir": dps["peak_mem_mb"] / max(ldir["peak_mem_mb"], 1e-9),
        "ldir_steps_s_per_image": {str(s): r["s_per_image"] for s, r in sweep.items()},
        "ldir_steps_peak_mem_mb": {str(s): r["peak_mem_mb"] for s, r in sweep.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
