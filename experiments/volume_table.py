"""Volumes: slice-wise and z-coupled methods on the held-out ct-volumes, side by side in one run.

    python experiments/volume_table.py --split val --out outputs/volume_table_val     # tuning: lung-fused-ct-pathology_01
    python experiments/volume_table.py --split test --out outputs/volume_table        # rider-pilot_01, cmb-crc_01

Every job is ``ldir-reconstruct data=ct_volumes recon.volume=true data.slices=32`` (the centred 32 slices of every
volume of the split, 256x256, 1% noise, each slice measured with the 2-D geometry and seeded by its id) with
FBP, 2-D TV, 3-D TV, 2-D LDIR (the default), 3-D LDIR (the TV-anchored refinement along z) and 3-D LDIR in the
DDS form (z-coupled data consistency inside the loop), at each view count. Each job folder holds the NIfTI
volumes, orthogonal-view panels and per-volume metrics. Writes ``OUT/volume_table.json`` and
``OUT/volume_table.md`` (per volume and on average: axial and coronal PSNR / SSIM, seconds per slice) and prints it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation import stamp  # noqa: E402
from operator_table import job  # noqa: E402

METHODS = ["fbp", "tv", "tv3d", "ldir", "ldir3d", "ldir3d_dds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="prior bundle (default: the packaged one)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--split", default="val", help="val (tuning) or test (the reported table)")
    ap.add_argument("--views", type=int, nargs="+", default=[23, 10])
    ap.add_argument("--slab", type=int, default=32, help="centred slices per volume")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default="outputs/volume_table")
    ap.add_argument("extra", nargs="*", help="more overrides for every job (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    *baselines, main_method = args.methods
    results = {}
    for views in args.views:
        folder = out / f"views_{views}"
        job(["data=ct_volumes", f"paths.data_dir={args.data_dir}", f"data.predict_split={args.split}",
             f"data.slices={args.slab}", "recon.volume=true", f"physics.num_views={views}",
             f"sampler={main_method}", f"baselines=[{','.join(baselines)}]",
             "progress=false", *([f"prior.path={args.prior}"] if args.prior else []), *args.extra], folder)
        with open(folder / "metrics.csv") as f:
            results[views] = list(csv.DictReader(f))
    (out / "volume_table.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"Volumes ({args.split}: centred {args.slab} slices each, 256x256, 1% noise; {stamp()}); "
          f"`python experiments/volume_table.py {' '.join(sys.argv[1:])}`. Cells: axial PSNR / SSIM | coronal PSNR / "
          "SSIM | s per slice.", ""]
    for views, rows in results.items():
        volumes = sorted({r["id"] for r in rows})
        md += [f"**{views} views**", "", "| method | " + " | ".join(volumes) + " | mean |",
               "|---|" + "---|" * (len(volumes) + 1)]
        for method in args.methods:
            mine = {r["id"]: r for r in rows if r["method"] == method}

            def cell(rs: list[dict]) -> str:
                def mean(key: str) -> float:  # nan where a slab is too thin for the metric (no column)
                    return sum(float(r.get(key) or "nan") for r in rs) / len(rs)
                return (f"{mean('psnr'):.2f} / {mean('ssim'):.3f} \\| {mean('psnr_coronal'):.2f} / "
                        f"{mean('ssim_coronal'):.3f} \\| {mean('seconds'):.1f}")
            md.append(f"| {method} | " + " | ".join(cell([mine[v]]) for v in volumes)
                      + f" | {cell(list(mine.values()))} |")
        md.append("")
    (out / "volume_table.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
