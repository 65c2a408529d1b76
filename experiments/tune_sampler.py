"""Sampler settings side by side: PSNR / SSIM and seconds per slice on the same slices and noise.

    python experiments/tune_sampler.py --views 23 --max-images 6 \\
        --candidate "default=" --candidate "fast=num_steps=10 guidance.final_steps=10" --candidate "paper=sampler=ldir_paper"
    python experiments/tune_sampler.py --split test --candidate ... --out outputs/speed   # the speed / quality table

Each candidate is ``NAME=OVERRIDES``: space-separated Hydra overrides of the sampler config (``sampler=...`` picks
another one; ``sampler.`` is implied, root keys such as ``tv.weight`` pass as they are), on top of
``sampler=ldir``: what wins here is what ``ldir-reconstruct`` runs. Tune on the validation patients (the
default); ``--split test`` only reports. Measurements are simulated once per view count with the app's seeded
noise; FBP and TV run on the same measurements. Writes ``OUT/speed.json`` and ``OUT/speed.md`` and prints them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation import stamp  # noqa: E402


def evaluate(views: int, candidates: list[tuple[str, list[str]]], args) -> list[dict]:
    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import compose_sampler, load_sampler
    from ldir_pl.metrics import image_metrics

    base = ["data=dicom", f"data.root={args.data_root}", f"data.predict_split={args.split}",
            f"data.max_images={args.max_images or 'null'}", f"physics.num_views={views}",
            *([f"prior.path={args.prior}"] if args.prior else []), *args.overrides]
    cfg = compose_sampler("fbp", base)
    physics, dm = instantiate(cfg.physics), instantiate(cfg.data)
    items = dm.items(args.split)
    ids = [i for i, _ in items]
    x = torch.stack([load() for _, load in items])
    y = physics.measure(x, ids)
    rows = []
    for name, over in [("fbp", ["sampler=fbp"]), ("tv", ["sampler=tv"]), *candidates]:
        group = [o.split("=", 1)[1] for o in over if o.startswith("sampler=")] or ["ldir"]
        method = load_sampler(group[0], overrides=[*base, *(o for o in over if not o.startswith("sampler=")),
                                                   "progress=false"])
        start = time.perf_counter()
        out = torch.cat([method.reconstruct(y[i:i + args.batch], physics, ids[i:i + args.batch])
                         for i in range(0, len(ids), args.batch)])
        sec = (time.perf_counter() - start) / len(ids)
        m = {k: float(v.mean()) for k, v in image_metrics(out.clamp(0, 1), x).items()}
        rows.append({"views": views, "name": name, "overrides": " ".join(over), "n": len(ids), **m, "s_per_slice": sec})
        print(f"{views} views, {name}: {m['psnr']:.2f} / {m['ssim']:.3f}, {sec:.1f} s/slice", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="prior bundle (default: the packaged one)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--views", type=int, nargs="+", default=[23])
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2, help="slices per call")
    ap.add_argument("--candidate", action="append", default=[], help="NAME=OVERRIDES; repeat the flag")
    ap.add_argument("--out", default="outputs/tune_sampler")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every setting (after --)")
    args = ap.parse_args()
    candidates = []
    for spec in args.candidate or ["default="]:
        name, _, text = spec.partition("=")
        candidates.append((name, shlex.split(text)))
    rows = [r for views in args.views for r in evaluate(views, candidates, args)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = [f"Sampler settings on the {args.split} patients of ct-dicom, n = {rows[0]['n']} slices, batch {args.batch}, "
          f"1% noise ({stamp()}); `python experiments/tune_sampler.py {' '.join(sys.argv[1:])}`", "",
          "| views | setting | overrides | PSNR | SSIM | vs TV (dB) | s/slice |", "|---|---|---|---|---|---|---|"]
    tv = {r["views"]: r for r in rows if r["name"] == "tv"}
    md += [f"| {r['views']} | {r['name']} | `{r['overrides'] or '-'}` | {r['psnr']:.2f} | {r['ssim']:.3f} | "
           f"{r['psnr'] - tv[r['views']]['psnr']:+.2f} | {r['s_per_slice']:.1f} |" for r in rows]
    (out / "speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
