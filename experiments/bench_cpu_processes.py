"""CPU processes sharing cores: LDIR predict in 1 process vs 2 DDP processes vs 2 independent processes.

Torch threads spin while they wait, so two processes that each start one thread per core slow each other
far more than 2x. Lightning's DDP launcher gives each of its processes cores / processes threads (when
OMP_NUM_THREADS is unset); independent processes (two runs started by hand, a parallel sweep launcher)
need OMP_NUM_THREADS set to their share. Each line is one configuration, timed side by side in this run:

    python experiments/bench_cpu_processes.py [--images 8] [--size 64] [--steps 10]

Run it with nothing else on the machine. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from ldir_pl.models.bundle import save_prior


def random_prior(out: Path, size: int) -> Path:
    """An untrained prior of the ct_cpu shapes' order (timing does not need trained weights)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        latent_channels=8, norm_num_groups=32, layers_per_block=1)
    lat = size // 4
    unet = UNet2DModel(sample_size=lat, in_channels=8, out_channels=8, block_out_channels=(32, 64, 128),
                       down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                       layers_per_block=1, norm_num_groups=32)
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    meta = {"intensity_transform": {"type": "affine", "scale": 2.0, "shift": -1.0, "data_range": [0, 1]},
            "image_size": size, "scaling_factor": 1.0}
    return save_prior(out, vae, unet, sched, meta)


def reconstruct(args, prior: Path, out: Path, extra: list[str], threads: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "ldir_pl.apps.reconstruct", "data=phantom", f"data.image_size={args.size}",
           f"data.num_test={args.images}", "data.batch_size=2", "physics.num_views=23", "sampler=ldir",
           f"sampler.num_steps={args.steps}", "sampler.guidance.final_steps=0", "sampler.refine=null", "progress=false",
           f"prior.path={prior}", "baselines=[]", "num_panels=0", "save_reconstructions=false",
           "trainer.accelerator=cpu", f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], t0: float) -> float:
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"reconstruct failed:\n{err[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_processes_"))
    prior = random_prior(tmp / "prior", args.size)
    half = max(1, cores // 2)
    runs: dict[str, dict] = {}

    def record(name: str, outs: list[Path], wall: float, images: int) -> None:
        sec = [json.loads((o / "summary.json").read_text())["ldir"]["seconds_per_image"] for o in outs]
        runs[name] = {"wall_s": round(wall, 2), "images": images, "images_per_s": round(images / wall, 3),
                      "loop_s_per_image": round(sum(sec) / len(sec), 3)}
        r = runs[name]
        print(f"{name:40s} wall {r['wall_s']:7.1f} s  {r['images_per_s']:6.3f} images/s  "
              f"in-loop {r['loop_s_per_image']:6.2f} s/image", flush=True)

    print(f"{cores} cores, {args.images} images {args.size}x{args.size}, {args.steps} LDIR steps per run")
    t0 = time.perf_counter()
    record(f"1 process, {cores} threads", [tmp / "one"],
           finish([reconstruct(args, prior, tmp / "one", [], cores)], t0), args.images)
    t0 = time.perf_counter()
    record(f"DDP 2 processes (Lightning: {half} threads each)", [tmp / "ddp"],
           finish([reconstruct(args, prior, tmp / "ddp", ["trainer.devices=2", "trainer.strategy=ddp"], None)], t0),
           args.images)
    for label, threads in ((f"2 independent, {cores} threads each", cores), (f"2 independent, {half} threads each", half)):
        outs = [tmp / f"{threads}_{i}" for i in range(2)]
        t0 = time.perf_counter()
        procs = [reconstruct(args, prior, o, [], threads) for o in outs]
        record(label, outs, finish(procs, t0), 2 * args.images)
    base = runs[f"1 process, {cores} threads"]["loop_s_per_image"]
    for r in runs.values():
        r["loop_slowdown_vs_1_process"] = round(r["loop_s_per_image"] / base, 2)
    print(json.dumps({"cores": cores, "images": args.images, "size": args.size, "steps": args.steps, "runs": runs}))


if __name__ == "__main__":
    main()
