"""Ship a trained prior with the package: fp16 safetensors under ``ldir_pl/priors/<name>/`` (``from_pretrained``
loads them in fp32) beside its README, with the training history and config in ``ldir_prior.json`` and the VAE's
fidelity on held-out patients.

    python experiments/package_prior.py --run outputs/ct_cpu_long --name ct256
    python experiments/package_prior.py --name ct256      # only rewrite its tables from the packaged JSON

Prints the folder's size (the package keeps it under 40 MiB) and decode(encode(x)) PSNR / SSIM on the ct-dicom
test patients, fp32 and fp16 weights side by side, which the prior's README quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation import stamp  # noqa: E402


def vae_fidelity(prior: str | Path, data_root: str, split: str, max_images: int | None = None) -> dict:
    """Mean PSNR / SSIM of decode(encode(x)) (posterior mean) on the split's slices, with n."""
    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import compose_sampler
    from ldir_pl.metrics import image_metrics
    from ldir_pl.models.bundle import PriorBundle

    bundle = PriorBundle.from_pretrained(prior)
    dm = instantiate(compose_sampler("fbp", ["data=dicom", f"data.root={data_root}"]).data)
    items = dm.items(split)[:max_images]
    psnr, ssim = [], []
    with torch.no_grad():
        for i in range(0, len(items), 4):
            x = torch.stack([load() for _, load in items[i:i + 4]])
            m = image_metrics(bundle.decode(bundle.encode(x)).clamp(0, 1), x)
            psnr += m["psnr"].tolist()
            ssim += m["ssim"].tolist()
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "n": len(psnr)}


def write_tables(dest: Path, cmd: str, out: Path) -> None:
    """``OUT/{training,vae_fidelity}.md`` from the packaged folder's JSON files: every training run of these
    weights (``ldir_prior.json``'s history: the runs it continued, then its own), the total per stage, and the VAE's
    fidelity."""
    out.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    history = json.loads((dest / "ldir_prior.json").read_text()).get("training_history", [])
    fidelity = json.loads((dest / "vae_fidelity.json").read_text())
    rows = [f"Training of `{dest.name}` ({size / 1e6:.1f} MB on disk); {cmd}", "",
            "| stage | run | date | where | epochs | images seen | minutes | validation |", "|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(history, 1):
        metric = ", ".join(f"{key} {v:.4g}" for key, v in r.items() if key.startswith("val/") and v is not None)
        rows.append(f"| {r['stage']} | {k}: {r.get('experiment', '-')} | {r.get('date', '-')} | {r.get('where', '-')} | "
                    f"{r.get('epochs', '-')} | {r.get('images_seen', '-')} | {r.get('minutes', 0):.0f} | {metric} |")
    for stage in dict.fromkeys(r["stage"] for r in history):
        runs = [r for r in history if r["stage"] == stage]
        rows.append(f"| **{stage} total** | {len(runs)} run(s) | | | {sum(r.get('epochs', 0) for r in runs)} | "
                    f"{sum(r.get('images_seen', 0) for r in runs)} | **{sum(r.get('minutes', 0) for r in runs):.0f}** | |")
    (out / "training.md").write_text("\n".join(rows) + "\n")
    (out / "vae_fidelity.md").write_text("\n".join(
        [f"decode(encode(x)) on the ct-dicom test patients; {cmd}", "", "| weights | PSNR | SSIM | n |",
         "|---|---|---|---|"]
        + [f"| {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['n']} |" for k, v in fidelity.items()]) + "\n")


#: what a bundle folder holds (the packaged folder's README.md and sample grid stay)
BUNDLE_PARTS = ("vqvae", "unet", "scheduler", "model_index.json", "ldir_prior.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an ldir-train output folder (holding prior/); without it, only the tables are "
                                  "written from the packaged folder")
    ap.add_argument("--name", default="ct256")
    ap.add_argument("--dest", default=None, help="where the packaged prior goes (default: ldir_pl/priors/NAME)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--out", default="outputs/package_prior", help="where the tables go")
    ap.add_argument("--max-images", type=int, default=None, help="test slices of the VAE fidelity (default: all)")
    args = ap.parse_args()
    dest = Path(args.dest) if args.dest else ROOT / "ldir_pl" / "priors" / args.name
    cmd = f"`python experiments/package_prior.py {' '.join(sys.argv[1:])}` ({stamp()})".replace(str(ROOT) + "/", "")
    if args.run is None:
        write_tables(dest, cmd, Path(args.out))
        return

    from ldir_pl.models.bundle import PriorBundle

    run = Path(args.run)
    staged = dest.parent / f".staged-{dest.name}"
    PriorBundle.from_pretrained(run / "prior").save_pretrained(staged, half=True)
    dest.mkdir(parents=True, exist_ok=True)
    for part in BUNDLE_PARTS:  # swap the bundle's parts in; the README and the sample grid stay
        target = dest / part
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(str(staged / part), str(target))
    shutil.rmtree(staged)
    meta = dest / "ldir_prior.json"  # the training config, with this machine's folders made relative
    text = meta.read_text().replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")
    meta.write_text(text)
    fidelity = {"fp32": vae_fidelity(run / "prior", args.data_root, "test", args.max_images),
                "fp16": vae_fidelity(dest, args.data_root, "test", args.max_images)}
    (dest / "vae_fidelity.json").write_text(json.dumps(fidelity, indent=2) + "\n")
    (dest / "train_summary.json").unlink(missing_ok=True)  # the history in ldir_prior.json says it all
    write_tables(dest, cmd, Path(args.out))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"folder": str(dest), "megabytes": size / 1e6, "vae_test": fidelity}, indent=2))


if __name__ == "__main__":
    main()
