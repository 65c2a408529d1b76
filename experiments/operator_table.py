"""LDIR vs TV vs the pseudo-inverse on non-CT inverse problems (blur, inpainting, super-resolution) with the
CT prior, on the *validation* patients of ct-dicom, side by side in one run.

    python experiments/operator_table.py --prior outputs/ct_cpu/prior --max-images 6 --out outputs/operator_table

Per operator (its ``conf/physics`` defaults: Gaussian blur sigma 2 px, 70% random pixels missing, x4 area
downsampling; 1% Gaussian noise): the TV weight is picked on these images from ``--tv-weights`` (TV's best
is what LDIR is compared with, and LDIR's TV-anchored refinement uses the same weight); LDIR runs with its
defaults otherwise. Every job is an ``ldir-reconstruct`` run (``run(cfg)``), so each folder under ``--out``
has its metrics.csv, summary.json and panels. Prints a markdown table and writes ``--out/table.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job(overrides: list[str], out: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from ldir_pl.conf_dir import CONF_DIR
    from ldir_pl.reconstruct import run

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("reconstruct", [*overrides, f"output_dir={out}"])
    return run(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", required=True)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--physics", nargs="+", default=["blur", "inpainting", "superres"])
    ap.add_argument("--tv-weights", type=float, nargs="+", default=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4])
    ap.add_argument("--max-images", type=int, default=6)
    ap.add_argument("--split", default="val", help="validation patients: nothing is reported on test here")
    ap.add_argument("--out", default="outputs/operator_table")
    ap.add_argument("extra", nargs="*", help="more overrides for the LDIR jobs (after --)")
    args = ap.parse_args()
    prior = json.loads((Path(args.prior) / "ldir_prior.json").read_text())
    out = Path(args.out)
    data = ["data=dicom", f"data.root={args.data_root}", f"data.predict_split={args.split}",
            f"data.max_images={args.max_images}", f"data.image_size={prior['image_size']}", "data.batch_size=2",
            "trainer.enable_progress_bar=false", "num_panels=2"]
    table = {}
    for name in args.physics:
        t0 = time.perf_counter()
        tv = {w: job([*data, f"physics={name}", "sampler=tv", f"sampler.weight={w}", "baselines=[pinv]"],
                     out / name / f"tv_{w:g}") for w in args.tv_weights}
        best = max(tv, key=lambda w: tv[w]["tv"]["psnr"])
        ldir = job([*data, f"physics={name}", "sampler=ldir", f"prior.path={args.prior}", "sampler.progress=false",
                    f"sampler.refine.tv_weight={best}", "baselines=[pinv]", *args.extra], out / name / "ldir")
        table[name] = {"pinv": ldir["pinv"], "tv": tv[best]["tv"], "tv_weight": best, "ldir": ldir["ldir"],
                       "tv_by_weight": {f"{w:g}": r["tv"]["psnr"] for w, r in tv.items()},
                       "seconds": time.perf_counter() - t0}
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    n = next(iter(table.values()))["ldir"]["n"]
    print(f"\n{args.split} patients of ct-dicom, n={n} slices, prior {args.prior}; PSNR dB / SSIM")
    print("| operator | pseudo-inverse | TV (weight picked here) | LDIR | LDIR - TV | LDIR s/image |")
    print("|---|---|---|---|---|---|")
    for name, r in table.items():
        cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.3f}" for m in ("pinv", "tv", "ldir")]
        print(f"| {name} | {cells[0]} | {cells[1]} ({r['tv_weight']:g}) | {cells[2]} | "
              f"{r['ldir']['psnr'] - r['tv']['psnr']:+.2f} dB | {r['ldir']['seconds_per_image']:.0f} |")


if __name__ == "__main__":
    main()
