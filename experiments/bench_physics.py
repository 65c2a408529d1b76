"""Forward+adjoint time of the two ray-transform backends side by side, and the one-off matrix export cost.

    python experiments/bench_physics.py [--device cpu|cuda] [--batch 8] [--reps 5]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ldir_pl.physics import CTGeometry, RayTransform
from ldir_pl.physics.system_matrix import load_system_matrix


def timed(fn, reps: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", default="256x23,256x60,512x60")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {"device": str(device), "torch_threads": torch.get_num_threads(), "batch": args.batch, "cases": {}}
    print(f"{'case':<10}{'export s':>10}{'odl ms':>10}{'sparse ms':>11}{'speed-up':>10}")
    with tempfile.TemporaryDirectory() as cache:
        for case in args.cases.split(","):
            size, views = (int(v) for v in case.split("x"))
            g = CTGeometry(beam="parallel", num_views=views, image_size=size)
            t0 = time.perf_counter()
            load_system_matrix(g, cache)
            export = time.perf_counter() - t0
            sparse = RayTransform(g, "sparse", cache_dir=cache)
            ref = RayTransform(g, "odl", impl="astra_cuda" if device.type == "cuda" else "astra_cpu")
            x = torch.rand(args.batch, 1, size, size, device=device)
            y = torch.rand(args.batch, 1, *g.sino_shape, device=device)
            t_sparse = timed(lambda a=sparse, x=x, y=y: (a(x), a.adjoint(y)), args.reps, device)
            t_odl = timed(lambda a=ref, x=x, y=y: (a(x), a.adjoint(y)), max(1, args.reps // 2), device)
            results["cases"][case] = {"export_s": export, "odl_ms": 1e3 * t_odl, "sparse_ms": 1e3 * t_sparse,
                                      "speedup": t_odl / t_sparse}
            print(f"{case:<10}{export:>10.2f}{1e3 * t_odl:>10.1f}{1e3 * t_sparse:>11.1f}{t_odl / t_sparse:>9.1f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
