"""LDIR vs TV vs the pseudo-inverse on non-CT inverse problems (blur, inpainting, super-resolution) with the CT
prior, side by side in one run.

    python experiments/operator_table.py --split test --out outputs/operator_table

Per operator (its ``conf/physics`` defaults: Gaussian blur sigma 2 px, 70% random pixels missing, x4 area
downsampling; 1% Gaussian noise) TV runs with its weight from ``tv_weights`` in ``conf/reconstruct.yaml``
(tuned on the validation patients by ``experiments/tune_tv.py --physics blur inpainting superres``) until it
converges, and LDIR's refinement uses the same TV problem. Every job is an ``ldir-reconstruct`` run, so each
folder under ``--out`` has its metrics.csv, summary.json and panels. Writes ``OUT/table.json`` and
``OUT/table.md`` (with date and commit) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation import stamp  # noqa: E402


def job(overrides: list[str], out: Path) -> dict:
    from ldir_pl.apps.reconstruct import run
    from ldir_pl.config import compose

    cfg = compose("reconstruct", [*overrides, f"output_dir={out}"])
    return run(cfg), float(cfg.tv.weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="prior bundle (default: the packaged one)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--physics", nargs="+", default=["blur", "inpainting", "superres"])
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--split", default="val", help="val while tuning; test for the reported table")
    ap.add_argument("--out", default="outputs/operator_table")
    ap.add_argument("extra", nargs="*", help="more overrides for every job (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    data = ["data=dicom", f"data.root={args.data_root}", f"data.predict_split={args.split}",
            f"data.max_images={args.max_images or 'null'}", "progress=false", "num_panels=2",
            ] + ([f"prior.path={args.prior}"] if args.prior else [])
    table = {}
    for name in args.physics:
        summary, weight = job([*data, f"physics={name}", "sampler=ldir", "baselines=[pinv,tv]", *args.extra],
                              out / name)
        table[name] = {**summary, "tv_weight": weight}
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    n = next(iter(table.values()))["ldir"]["n"]
    md = [f"Other operators with the CT prior, {args.split} patients of ct-dicom, n = {n} slices, 1% noise ({stamp()}); "
          f"`python experiments/operator_table.py {' '.join(sys.argv[1:])}`", "",
          "| operator | pseudo-inverse | TV (weight) | LDIR | LDIR - TV | LDIR s/image |", "|---|---|---|---|---|---|"]
    for name, r in table.items():
        cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.3f}" for m in ("pinv", "tv", "ldir")]
        md.append(f"| {name} | {cells[0]} | {cells[1]} ({r['tv_weight']:g}) | {cells[2]} | "
                  f"{r['ldir']['psnr'] - r['tv']['psnr']:+.2f} dB | {r['ldir']['seconds_per_image']:.1f} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
