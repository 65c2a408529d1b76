"""What the diffusion prior adds: every row on the same images and the same noise, with the paired per-image
difference to TV at its best and 95% bootstrap intervals (over images, and over patients).

    python experiments/ablation.py --split val --max-images 6 --out outputs/ablation_val      # while tuning
    python experiments/ablation.py --split test --out outputs/ablation                       # the reported table

Rows (all from the app's configs, ``conf/sampler/*.yaml``):
  tv                     TV, weight tuned on validation patients, run until it converges
  tv from ldir           the same TV problem started from the LDIR sample (lam = 0): TV's minimiser again
  refine(fbp)            the TV-anchored refinement anchored on the FBP image (no prior at all)
  refine(vae(fbp))       ... anchored on decode(encode(FBP)): the VAE's projection, no diffusion step
  ldir, 0 ddim steps     warm start, final latent steps, refinement: the decoder's range without the UNet
  ldir (default)         the default: the LDIR sample plus the TV-anchored refinement
  ldir, no refinement    the LDIR sample as decoded
  ldir_paper             the paper's loop (noise at T, Adam, no warm start, no refinement)
``--extra NAME=OVERRIDES`` adds rows (e.g. ``--extra "ldir_mean=sampler=ldir_mean"``). The prior's share is the
default minus the best row that runs no UNet, with its own paired interval. Writes ``OUT/ablation.json`` and
``OUT/ablation.md`` (the table, with date and commit) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_UNET = ("tv", "refine(fbp)", "refine(vae(fbp))", "ldir, 0 ddim steps")


def stamp() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return f"{date.today().isoformat()}, commit {commit.strip() or 'unknown'}"


def bootstrap(diff, groups=None, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diff``, resampling images (or whole ``groups``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    diff = np.asarray(diff, dtype=float)
    if groups is None:
        means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(1)
    else:
        keys = sorted(set(groups))
        members = [np.flatnonzero(np.asarray(groups) == k) for k in keys]
        means = np.empty(n)
        for b in range(n):
            pick = np.concatenate([members[i] for i in rng.integers(0, len(keys), size=len(keys))])
            means[b] = diff[pick].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def evaluate(views: int, common: list[str], args) -> dict:
    """Every row at one view count: per-image metrics, paired differences to TV, the prior's share."""
    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import compose_sampler, load_sampler
    from ldir_pl.metrics import image_metrics
    from ldir_pl.sampling.refine import AnchoredTV

    cfg = compose_sampler("ldir", [*common, f"physics.num_views={views}"])
    physics, dm = instantiate(cfg.physics), instantiate(cfg.data)
    items = dm.items(args.split)
    ids = [i for i, _ in items]
    patients = [dm.patient_of(i) for i in ids]
    x = torch.stack([load() for _, load in items])
    y = physics.measure(x, ids)
    batch = args.batch or int(cfg.data.batch_size)
    tv_over = [*common, f"physics.num_views={views}"]
    over = [*tv_over, "progress=false"]  # LDIR's progress bar off; TV has none

    def run(fn) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        res = torch.cat([fn(y[i:i + batch], ids[i:i + batch], i) for i in range(0, len(ids), batch)])
        return res.clamp(0, 1), (time.perf_counter() - start) / len(ids)

    tv = load_sampler("tv", overrides=tv_over)
    ldir = load_sampler("ldir", overrides=over)
    anchored = ldir.refine
    rows: dict[str, tuple[torch.Tensor, float]] = {}
    rows["tv"] = run(lambda yb, ib, i: tv.reconstruct(yb, physics, ib))
    fbp, fbp_s = run(lambda yb, ib, i: physics.A_dagger(yb))
    samples, sample_s = run(lambda yb, ib, i: ldir.sample(yb, physics, ib).images)
    refined, refine_s = run(lambda yb, ib, i: anchored(samples[i:i + len(ib)], yb, physics))
    rows["tv from ldir"] = run(lambda yb, ib, i: AnchoredTV(anchored.tv, 0.0)(samples[i:i + len(ib)], yb, physics))
    rows["tv from ldir"] = (rows["tv from ldir"][0], rows["tv from ldir"][1] + sample_s)
    ref_fbp = run(lambda yb, ib, i: anchored(fbp[i:i + len(ib)], yb, physics))
    rows["refine(fbp)"] = (ref_fbp[0], ref_fbp[1] + fbp_s)
    with torch.no_grad():
        vae_fbp = torch.cat([ldir.prior.decode(ldir.prior.encode(fbp[i:i + batch])) for i in range(0, len(ids), batch)])
    ref_vae = run(lambda yb, ib, i: anchored(vae_fbp[i:i + len(ib)], yb, physics))
    rows["refine(vae(fbp))"] = (ref_vae[0], ref_vae[1] + fbp_s)
    zero = load_sampler("ldir", overrides=[*over, "num_steps=0"])
    rows["ldir, 0 ddim steps"] = run(lambda yb, ib, i: zero.reconstruct(yb, physics, ib))
    rows["ldir (default)"] = (refined, sample_s + refine_s)
    rows["ldir, no refinement"] = (samples.clamp(0, 1), sample_s)
    if not args.skip_paper:
        paper = load_sampler("ldir_paper", overrides=over)
        rows["ldir_paper"] = run(lambda yb, ib, i: paper.reconstruct(yb, physics, ib))
    for spec in args.extra:
        name, _, text = spec.partition("=")
        extra = shlex.split(text)
        group = [o.split("=", 1)[1] for o in extra if o.startswith("sampler=")]
        method = load_sampler(group[0] if group else "ldir", overrides=[*over, *(o for o in extra
                                                                                 if not o.startswith("sampler="))])
        rows[name] = run(lambda yb, ib, i, m=method: m.reconstruct(yb, physics, ib))
    metrics = {k: {m: v.tolist() for m, v in image_metrics(r, x).items()} for k, (r, _) in rows.items()}
    base = torch.tensor(metrics["tv"]["psnr"])
    table = {}
    for name, (_, sec) in rows.items():
        p, s = torch.tensor(metrics[name]["psnr"]), torch.tensor(metrics[name]["ssim"])
        d = (p - base).tolist()
        table[name] = {"psnr": float(p.mean()), "ssim": float(s.mean()), "n": len(ids), "s_per_image": sec,
                       "d_psnr_vs_tv": float(p.mean() - base.mean()), "ci_images": bootstrap(d),
                       "ci_patients": bootstrap(d, patients),
                       "d_ssim_vs_tv": float(s.mean() - torch.tensor(metrics["tv"]["ssim"]).mean())}
    best_free = max(NO_UNET, key=lambda k: table[k]["psnr"])
    share = (torch.tensor(metrics["ldir (default)"]["psnr"]) - torch.tensor(metrics[best_free]["psnr"])).tolist()
    return {"rows": table, "per_image": metrics, "ids": ids, "patients": patients,
            "prior_share": {"vs": best_free, "d_psnr": sum(share) / len(share),
                            "ci_images": bootstrap(share), "ci_patients": bootstrap(share, patients)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="prior bundle (default: the packaged one)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--split", default="val", help="val while tuning; test only for the reported table")
    ap.add_argument("--views", type=int, nargs="+", default=[23, 10])
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="images per call (default: reconstruct.yaml's data)")
    ap.add_argument("--extra", action="append", default=[], help="NAME=hydra overrides of a further LDIR row")
    ap.add_argument("--skip-paper", action="store_true", help="leave out the ldir_paper row (slow)")
    ap.add_argument("--out", default="outputs/ablation")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every row (after --), e.g. tv.max_iterations=50")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["data=dicom", f"data.root={args.data_root}", f"data.predict_split={args.split}",
              f"data.max_images={args.max_images or 'null'}"] + ([f"prior.path={args.prior}"] if args.prior else []) \
        + list(args.overrides)
    results = {}
    for views in args.views:
        results[views] = evaluate(views, common, args)
        print(f"{views} views done ({len(results[views]['ids'])} images)", flush=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"Ablation on the {args.split} patients of ct-dicom, 1% noise ({stamp()}); "
          f"`python experiments/ablation.py {' '.join(sys.argv[1:])}`", ""]
    for views, r in results.items():
        n, npat = r["rows"]["tv"]["n"], len(set(r["patients"]))
        md += [f"**{views} views** (n = {n} slices of {npat} patients; intervals: 95% bootstrap of the paired mean "
               "difference, over images / over patients)", "",
               "| row | PSNR | SSIM | vs TV (dB) | 95% CI images | 95% CI patients | s/image |",
               "|---|---|---|---|---|---|---|"]
        for name, t in r["rows"].items():
            md.append(f"| {name} | {t['psnr']:.2f} | {t['ssim']:.3f} | {t['d_psnr_vs_tv']:+.2f} | "
                      f"[{t['ci_images'][0]:+.2f}, {t['ci_images'][1]:+.2f}] | "
                      f"[{t['ci_patients'][0]:+.2f}, {t['ci_patients'][1]:+.2f}] | {t['s_per_image']:.1f} |")
        s = r["prior_share"]
        md += ["", f"Prior's share (default minus the best row without the UNet, `{s['vs']}`): "
               f"**{s['d_psnr']:+.2f} dB**, 95% CI [{s['ci_images'][0]:+.2f}, {s['ci_images'][1]:+.2f}] over images, "
               f"[{s['ci_patients'][0]:+.2f}, {s['ci_patients'][1]:+.2f}] over patients.", ""]
    (out / "ablation.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
