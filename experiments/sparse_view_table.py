"""Sparse-view table end to end: a Hydra multirun of ``ldir-reconstruct`` over views x methods.

    python experiments/sparse_view_table.py --prior outputs/ct_cpu/prior --out outputs/sparse_view_table -- data.batch_size=2
    python experiments/sparse_view_table.py --prior P --views 23 10 --methods ldir latent_dps --max-images 4 \
        -- sampler.num_steps=30

Runs ``python -m ldir_pl.apps.reconstruct -m physics.num_views=<views> sampler=<methods>`` with FBP and TV as
baselines in every job, on the *test* patients of ``../shared/data/ct-dicom`` (``data.predict_split=test``:
the patient split of ``data=dicom`` / ``data=ct_mix``, which no training, checkpoint choice or sampler tuning
sees; tune with ``experiments/tune_sampler.py`` on the validation patients; reference protocol: 256x256,
1% Gaussian noise). Next to the
methods it measures the VAE's own fidelity on the same images (encode the ground truth, decode), the cap
of any purely latent method. Writes ``OUT/<job>/`` (each job's summary, panels, configs),
``OUT/table.md``, ``OUT/psnr_vs_views.png`` and ``OUT/sweep_summary.json``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vae_fidelity(prior: str, data_root: str, split: str, max_images: int | None, views: list[int]) -> dict:
    """PSNR/SSIM of decode(encode(x)) on the evaluated images (posterior mean, no sampling)."""
    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import compose
    from ldir_pl.metrics import image_metrics
    from ldir_pl.models.bundle import PriorBundle

    sampler = PriorBundle.from_pretrained(prior)  # the bundle's own encode/decode and transforms
    cfg = compose("reconstruct", [  # the app's data config: the same split
        "data=dicom", f"data.root={data_root}", f"data.image_size={int(sampler.image_size)}",
        f"data.max_images={'null' if max_images is None else max_images}"])
    items = instantiate(cfg.data).items(split)
    psnr, ssim = [], []
    with torch.no_grad():
        for i in range(0, len(items), 4):
            x = torch.stack([load() for _, load in items[i:i + 4]])
            xr = sampler.decode(sampler.encode(x)).clamp(0, 1)
            m = image_metrics(xr, x)
            psnr += m["psnr"].tolist()
            ssim += m["ssim"].tolist()
    entry = {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "seconds_per_image": None,
             "peak_mem_mb": None, "n": len(psnr)}
    return {v: entry for v in views}  # does not depend on the geometry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="latent prior bundle (default: the packaged one)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--out", default="outputs/sparse_view_table")
    ap.add_argument("--views", type=int, nargs="+", default=[23, 10])
    ap.add_argument("--methods", nargs="+", default=["ldir"],
                    help="names of conf/sampler/*.yaml swept as the main method")
    ap.add_argument("--baselines", nargs="+", default=["fbp", "tv"])
    ap.add_argument("--split", default="val", help="data.predict_split: val while tuning; test (patients nothing "
                    "was tuned on) only for the reported table")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (after --)")
    args = ap.parse_args()

    from ldir_pl.apps.sweep_report import markdown_table, write_sweep_report

    out = Path(args.out).resolve()
    if not Path(args.data_root).is_dir():
        sys.exit(f"data folder {args.data_root} not found: pass --data-root")
    if args.prior is None:
        from ldir_pl.priors import packaged_prior

        args.prior = str(packaged_prior("ct256"))
    if not (Path(args.prior) / "ldir_prior.json").exists():
        sys.exit(f"{args.prior} is not a prior bundle (no ldir_prior.json): train one with ldir-train")
    cmd = [
        sys.executable, "-m", "ldir_pl.apps.reconstruct", "-m",
        f"hydra.sweep.dir={out}", f"output_dir={out}",
        "data=dicom", f"data.root={args.data_root}", f"data.predict_split={args.split}",
        f"data.max_images={'null' if args.max_images is None else args.max_images}",
        f"prior.path={Path(args.prior).resolve()}", f"baselines=[{','.join(args.baselines)}]",
        f"physics.num_views={','.join(map(str, args.views))}", f"sampler={','.join(args.methods)}",
        *args.overrides,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    extra = {"vae (decode(encode(x)))": vae_fidelity(args.prior, args.data_root, args.split, args.max_images,
                                                      args.views)}
    results = write_sweep_report(out, extra)  # the sweep's own report, rewritten with the VAE row
    print(markdown_table(results, extra))
    print(json.dumps({m: {v: round(e["psnr"], 2) for v, e in bv.items() if e.get("psnr") is not None}
                      for m, bv in {**results, **extra}.items()}))


if __name__ == "__main__":
    main()
