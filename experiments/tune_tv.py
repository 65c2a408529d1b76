"""TV at its best: its stopping tolerance and its weight per view count, chosen on the *validation* patients.

    python experiments/tune_tv.py --out outputs/tune_tv                      # CT at 23 and 10 views
    python experiments/tune_tv.py --physics blur inpainting superres --out outputs/tune_tv_ops

For every view count (CT) or operator: (1) convergence of PDHG at the configured weight, tolerance by
tolerance, against a run to 1e-6 (PSNR gap, iterations, seconds); (2) the weight grid at the configured
tolerance, mean PSNR / SSIM per weight. The best weight per view count is what ``tv_weights`` in
``conf/reconstruct.yaml`` holds. Measurements follow the app (its data split, seeded 1% noise). Writes
``OUT/tune_tv.json`` and ``OUT/tune_tv.md`` (the tables, with date and commit) and prints them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS = {"ct": [0.5e-5, 0.75e-5, 1e-5, 1.5e-5, 2e-5, 3e-5, 4e-5, 6e-5],
           "blur": [3e-8, 1e-7, 3e-7, 1e-6, 3e-6],
           "inpainting": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
           "superres": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]}
TOLS = [1e-3, 3e-4, 1e-4, 3e-5]


def stamp() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return f"{date.today().isoformat()}, commit {commit.strip() or 'unknown'}"


def problems(args) -> list[tuple[str, list[str]]]:
    if args.physics == ["parallel"]:
        return [(f"{v} views", [f"physics.num_views={v}"]) for v in args.views]
    return [(p, [f"physics={p}"]) for p in args.physics]


def study_volumes(views: int, args) -> dict:
    """TV along z on the split's held-out volumes (``data=ct_volumes``, a centred slab): its weight grid, next to
    slice-wise TV at the tuned weight, axial and coronal PSNR."""
    from hydra.utils import instantiate

    from ldir_pl.config import compose_sampler
    from ldir_pl.metrics import volume_metrics
    from ldir_pl.physics import VolumePhysics
    from ldir_pl.sampling.tv import TVReconstructor

    cfg = compose_sampler("tv", ["data=ct_volumes", f"paths.data_dir={Path(args.data_root).parent}",
                                 f"data.slices={args.slab}", f"physics.num_views={views}", *args.overrides])
    physics, dm = instantiate(cfg.physics), instantiate(cfg.data)
    volumes = dm.volumes(args.split)
    weight, tol, max_it = float(cfg.tv.weight), float(cfg.tv.tol), int(cfg.tv.max_iterations)

    def run(w: float, along_z: bool) -> dict:
        tv, ms, start = TVReconstructor(w, max_it, tol, along_z=along_z), [], time.perf_counter()
        for vol in volumes:
            vp = VolumePhysics(physics, vol.z_ratio)
            ms.append(volume_metrics(tv.reconstruct(vp.measure(vol.images, vol.slice_ids), vp), vol.images))
        n = sum(v.images.shape[0] for v in volumes)
        return {"weight": w, "along_z": along_z, "psnr": sum(float(m["psnr"]) for m in ms) / len(ms),
                "ssim": sum(float(m["ssim"]) for m in ms) / len(ms),
                "psnr_coronal": sum(float(m["psnr_coronal"]) for m in ms) / len(ms),
                "s_per_slice": (time.perf_counter() - start) / n}

    rows = [run(weight, False)] + [run(w, True) for w in WEIGHTS["ct"]]
    for r in rows:
        print(f"{views} views, volumes: {'3-D' if r['along_z'] else '2-D'} TV {r['weight']:g}: {r['psnr']:.3f} / "
              f"{r['ssim']:.4f}, coronal {r['psnr_coronal']:.3f}", flush=True)
    best = max(rows[1:], key=lambda r: r["psnr"])
    return {"problem": f"{views} views, volumes", "volumes": [v.name for v in volumes], "slab": args.slab,
            "rows": rows, "best_weight": best["weight"]}


def study(label: str, overrides: list[str], args) -> dict:
    """Convergence and the weight grid for one view count or operator."""
    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import compose_sampler
    from ldir_pl.metrics import image_metrics
    from ldir_pl.sampling.tv import TVReconstructor

    cfg = compose_sampler("tv", ["data=dicom", f"data.root={args.data_root}", f"data.predict_split={args.split}",
                                 f"data.max_images={args.max_images or 'null'}", *overrides, *args.overrides])
    physics, dm = instantiate(cfg.physics), instantiate(cfg.data)
    items = dm.items(args.split)
    ids = [i for i, _ in items]
    x = torch.stack([load() for _, load in items])
    y = physics.measure(x, ids)
    weight, tol, max_it = float(cfg.tv.weight), float(cfg.tv.tol), int(cfg.tv.max_iterations)
    kind = type(physics).family

    def run(w: float, t: float, iters: int = max_it) -> dict:
        start = time.perf_counter()
        res = TVReconstructor(weight=w, max_iterations=iters, tol=t).solve(y, physics)
        sec = (time.perf_counter() - start) / len(ids)
        m = {k: v.tolist() for k, v in image_metrics(res.x, x).items()}
        return {"weight": w, "tol": t, "psnr": sum(m["psnr"]) / len(ids), "ssim": sum(m["ssim"]) / len(ids),
                "iterations_mean": sum(res.iterations) / len(ids), "iterations_max": max(res.iterations),
                "s_per_image": sec, "x": res.x}

    ref = run(weight, 1e-6, 10000)
    conv = []
    for t in TOLS:
        r = run(weight, t)
        r["gap_db"] = r["psnr"] - ref["psnr"]
        r["max_abs_diff"] = float((r.pop("x") - ref["x"]).abs().max())
        conv.append(r)
        print(f"{label}: tol {t:g}: {r['psnr']:.3f} dB (gap {r['gap_db']:+.3f}), "
              f"{r['iterations_mean']:.0f} it (max {r['iterations_max']}), {r['s_per_image']:.2f} s/image", flush=True)
    ref.pop("x")
    grid = []
    for w in WEIGHTS[kind]:
        r = run(w, tol)
        r.pop("x")
        grid.append(r)
        print(f"{label}: weight {w:g}: {r['psnr']:.3f} / {r['ssim']:.4f}, {r['iterations_mean']:.0f} it", flush=True)
    best = max(grid, key=lambda r: r["psnr"])
    return {"problem": label, "kind": kind, "n": len(ids), "patients_split": args.split,
            "configured_weight": weight, "reference": ref, "convergence": conv, "grid": grid,
            "best_weight": best["weight"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--split", default="val", help="the patients tuned on (val); never the test ones")
    ap.add_argument("--physics", nargs="+", default=["parallel"])
    ap.add_argument("--views", type=int, nargs="+", default=[23, 10])
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--volumes", action="store_true", help="tune TV along z on the held-out volumes of the split")
    ap.add_argument("--slab", type=int, default=32)
    ap.add_argument("--out", default="outputs/tune_tv")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.volumes:
        results = [study_volumes(v, args) for v in args.views]
        md = [f"TV along z on the {args.split} volumes (centred {args.slab} slices; {stamp()}); "
              f"`python experiments/tune_tv.py {' '.join(sys.argv[1:])}`", ""]
        for r in results:
            md += [f"**{r['problem']}** ({', '.join(r['volumes'])})", "", "| TV | weight | PSNR | SSIM | coronal PSNR |",
                   "|---|---|---|---|---|"]
            md += [f"| {'3-D' if x['along_z'] else '2-D'} | {x['weight']:g}"
                   f"{' (best)' if x['along_z'] and x['weight'] == r['best_weight'] else ''} | {x['psnr']:.3f} | "
                   f"{x['ssim']:.4f} | {x['psnr_coronal']:.3f} |" for x in r["rows"]]
            md.append("")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tune_tv3d.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "tune_tv3d.md").write_text("\n".join(md))
        print("\n".join(md))
        return
    results = [study(label, overrides, args) for label, overrides in problems(args)]
    (out / "tune_tv.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"TV tuning on the {args.split} patients ({stamp()}); `python experiments/tune_tv.py "
          f"{' '.join(sys.argv[1:])}`", ""]
    for r in results:
        md += [f"**{r['problem']}** (n = {r['n']}; convergence at weight {r['configured_weight']:g}, reference: "
               f"tol 1e-6, {r['reference']['psnr']:.3f} dB after {r['reference']['iterations_mean']:.0f} iterations)",
               "", "| tol | PSNR gap to reference | max abs diff | iterations (mean / max) | s/image |",
               "|---|---|---|---|---|"]
        md += [f"| {c['tol']:g} | {c['gap_db']:+.3f} dB | {c['max_abs_diff']:.4f} | {c['iterations_mean']:.0f} / "
               f"{c['iterations_max']} | {c['s_per_image']:.2f} |" for c in r["convergence"]]
        md += ["", "| weight | PSNR | SSIM | iterations |", "|---|---|---|---|"]
        md += [f"| {g['weight']:g}{' (best)' if g['weight'] == r['best_weight'] else ''} | {g['psnr']:.3f} | "
               f"{g['ssim']:.4f} | {g['iterations_mean']:.0f} |" for g in r["grid"]]
        md.append("")
    (out / "tune_tv.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
