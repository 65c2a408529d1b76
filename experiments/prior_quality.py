"""How good a prior is, without reconstructing anything: the held-out denoising loss and unconditional-sample
statistics of any bundle, and their curve against training time from a training run's logs.

    python experiments/prior_quality.py                                  # the packaged prior
    python experiments/prior_quality.py --prior OUT/prior --prior ldir_pl/priors/ct256 --curve OUT

For each bundle: epsilon MSE averaged over t = 50, 150, ..., 950 with fixed noise on the latents (posterior mean)
of the ct-dicom validation and test patients and of the held-out test volumes; 16 samples as ``ldir-sample``
draws them (seed 0, 50 DDIM steps): the share that passes the body check (one body region in air holding soft
tissue and bone, ``ldir_pl/models/prior_quality.py``) and the HU Wasserstein-1 distance to the test slices. The
same check on real slices is printed as a reference. ``--curve RUN`` plots ``val/eps_mse_grid``,
``val/body_share`` and ``val/hu_w1`` against ``val/train_minutes`` from the run's ``ldm`` logs (every run that
continued these weights counts its minutes). Writes ``OUT/prior_quality.{json,md}`` and the figure.
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

SHARED = ROOT.parent / "shared" / "data"


def held_out_images(data_dir: Path, max_volume_slices: int, overrides: list[str]) -> dict[str, torch.Tensor]:  # noqa: F821
    """Images in [0, 1] of ct-dicom's validation and test patients and of the held-out test volumes."""
    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import compose

    dicom = instantiate(compose("reconstruct", ["data=dicom", f"data.root={data_dir / 'ct-dicom'}", *overrides]).data)
    volumes = instantiate(compose("reconstruct", ["data=ct_volumes", f"paths.data_dir={data_dir}", *overrides]).data)
    out = {split: torch.stack([load() for _, load in dicom.items(split)]) for split in ("val", "test")}
    vol = volumes.items("test")
    step = max(1, len(vol) // max_volume_slices)
    out["test volumes"] = torch.stack([load() for _, load in vol[::step]])
    return out


def evaluate(prior: str, images: dict, num_samples: int, steps: int) -> dict:
    import torch

    from ldir_pl.models.bundle import PriorBundle
    from ldir_pl.models.prior_quality import T_GRID, body_check, ddim_samples, denoising_loss, hu_w1, to_hu

    bundle = PriorBundle.from_pretrained(prior)
    row: dict = {"prior": str(prior), "t_grid": list(T_GRID)}
    minutes = [r.get("minutes", 0.0) for r in bundle.metadata.get("training_history", []) if r.get("stage") == "ldm"]
    summary = Path(prior) / "train_summary.json"  # a bundle exported before histories were kept: its run's summary
    if not minutes and summary.is_file():
        seconds = json.loads(summary.read_text()).get("ldm", {}).get("seconds")
        minutes = [seconds / 60] if seconds else []
    row["ldm_minutes"] = sum(minutes) if minutes else None
    with torch.no_grad():
        for split, x in images.items():
            z = torch.cat([bundle.encode(x[i:i + 16]) for i in range(0, len(x), 16)])
            per_t = denoising_loss(bundle.unet, bundle.scheduler, z)
            row[f"eps_mse {split}"] = sum(per_t.values()) / len(per_t)
            row[f"eps_mse_per_t {split}"] = per_t
            row[f"n {split}"] = len(x)
        samples = ddim_samples(bundle.unet, bundle.scheduler.config, bundle.decode, bundle.latent_shape, num_samples,
                               steps, seed=0)
    checks = [body_check(h) for h in to_hu(samples[:, 0])]
    row["body_share"] = sum(c.passed for c in checks) / len(checks)
    row["body_reasons"] = [c.reason for c in checks]
    row["hu_w1"] = hu_w1(to_hu(samples), to_hu(images["test"]))
    row["hu_w1 val"] = hu_w1(to_hu(samples), to_hu(images["val"]))  # what training logs: the curve's reference
    return row


def real_reference(images: dict) -> dict:
    from ldir_pl.models.prior_quality import body_check, to_hu

    return {split: sum(body_check(h).passed for h in to_hu(x[:, 0])) / len(x) for split, x in images.items()}


def read_curve(run: Path) -> list[dict]:
    """Validation rows of every ``ldm`` log under ``run`` with the training minutes they were logged at."""
    rows = []
    for path in sorted(run.glob("ldm/logs/*/metrics.csv")):
        for r in csv.DictReader(path.open()):
            if r.get("val/eps_mse_grid") and r.get("val/train_minutes"):
                rows.append({k: float(r[k]) for k in ("val/train_minutes", "val/eps_mse_grid", "val/body_share",
                                                      "val/hu_w1", "val/loss") if r.get(k)} | {"epoch": int(r["epoch"])})
    return sorted(rows, key=lambda r: r["val/train_minutes"])


def plot_curve(rows: list[dict], start: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    keys = [("val/eps_mse_grid", "held-out eps MSE (t grid)"), ("val/body_share", "samples passing body check"),
            ("val/hu_w1", "HU W1 to real slices")]
    minutes = [r["val/train_minutes"] for r in rows]
    for ax, (key, label) in zip(axes, keys):
        ax.plot(minutes, [r.get(key, float("nan")) for r in rows], marker="o", ms=3)
        if start is not None and start.get("ldm_minutes") is not None:
            value = {"val/eps_mse_grid": start.get("eps_mse val"), "val/body_share": start.get("body_share"),
                     "val/hu_w1": start.get("hu_w1 val")}[key]
            ax.plot([start["ldm_minutes"]], [value], marker="s", color="k", label="run's starting bundle")
            ax.legend(fontsize=7)
        ax.set_xlabel("latent UNet training (minutes, all runs)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", action="append", default=None, help="bundle folder (repeat; default: the packaged one)")
    ap.add_argument("--data-dir", default=str(SHARED))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--volume-slices", type=int, default=40, help="slices of the held-out test volumes (evenly)")
    ap.add_argument("--curve", action="append", default=None,
                    help="a training run folder whose ldm logs give the curve (repeat for runs that continued it)")
    ap.add_argument("--start", default=None, help="the bundle the run started from (a point at its minutes)")
    ap.add_argument("--figure", default=str(ROOT / "docs" / "images" / "prior_quality_curve.png"))
    ap.add_argument("--out", default="outputs/prior_quality")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the data configs (after --), e.g. data.image_size=64")
    args = ap.parse_args()
    from ldir_pl.priors import packaged_prior

    priors = args.prior or [str(packaged_prior("ct256"))]
    images = held_out_images(Path(args.data_dir), args.volume_slices, args.overrides)
    rows = [evaluate(p, images, args.samples, args.steps) for p in priors]
    real = real_reference(images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "real_body_share": real}
    splits = list(images)
    md = [f"Prior quality without reconstruction ({stamp()}); `python experiments/prior_quality.py "
          f"{' '.join(sys.argv[1:])}`".replace(str(ROOT) + "/", ""), "",
          "| prior | UNet minutes | " + " | ".join(f"eps MSE {s} (n={len(images[s])})" for s in splits)
          + f" | body check ({args.samples} samples) | HU W1 to test slices |",
          "|---|---|" + "---|" * len(splits) + "---|---|"]
    for r in rows:
        name = r["prior"].replace(str(ROOT) + "/", "")
        minutes = f"{r['ldm_minutes']:.0f}" if r["ldm_minutes"] is not None else "-"
        md.append(f"| {name} | {minutes} | " + " | ".join(f"{r[f'eps_mse {s}']:.4f}" for s in splits)
                  + f" | {round(r['body_share'] * args.samples)}/{args.samples} | {r['hu_w1']:.0f} |")
    md += ["", "Real slices through the same body check: "
           + ", ".join(f"{s} {v:.0%} (n={len(images[s])})" for s, v in real.items()) + "."]
    if args.curve:
        curve = sorted((r for run in args.curve for r in read_curve(Path(run))), key=lambda r: r["val/train_minutes"])
        start = evaluate(args.start, images, args.samples, args.steps) if args.start else None
        plot_curve(curve, start, Path(args.figure))
        result["curve"] = curve
        figure = str(Path(args.figure).resolve()).replace(str(ROOT) + "/", "")
        md += ["", f"Curve: `{figure}` ({len(curve)} validations of {', '.join(f'`{c}`' for c in args.curve)})."]
    (out / "prior_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "prior_quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
