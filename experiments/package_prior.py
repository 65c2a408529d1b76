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
    runs: list[tuple] = []  # a run is one command: its stages share experiment and date
    for r in history:
        key = (r.get("experiment"), r.get("date"))
        if not runs or runs[-1] != key or r["stage"] == "vae":
            runs.append(key)
        k = len(runs)
        metric = ", ".join(f"{key} {v:.4g}" for key, v in r.items() if key.startswith("val/") and v is not None)
        rows.append(f"| {r['stage']} | {k}: {r.get('experiment', '-')} | {r.get('date', '-')} | {r.get('where', '-')} | "
                    f"{r.get('epochs', '-')} | {r.get('images_seen', '-')} | {r.get('minutes', 0):.0f} | {metric} |")
    for stage in dict.fromkeys(r["stage"] for r in history):
        done = [r for r in history if r["stage"] == stage]
        rows.append(f"| **{stage} total** | {len(done)} run(s) | | | {sum(r.get('epochs', 0) for r in done)} | "
                    f"{sum(r.get('images_seen', 0) for r in done)} | **{sum(r.get('minutes', 0) for r in done):.0f}** | |")
    (out / "training.md").write_text("\n".join(rows) + "\n")
    (out / "vae_fidelity.md").write_text("\n".join(
        [f"decode(encode(x)) on the ct-dicom test patients; {cmd}", "", "| weights | PSNR | SSIM | n |",
         "|---|---|---|---|"]
        + [f"| {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['n']} |" for k, v in fidelity.items()]) + "\n")


def bundle_from_checkpoint(ckpt: Path, where: str) -> Path:
    """The bundle of a latent-stage checkpoint of a run that stopped before exporting (``OUT/ldm/checkpoints/
    *.ckpt``): its EMA UNet and VAE, with the run's training history (minutes from the run's own log at the
    checkpoint's epoch) and data record, written to ``OUT/prior``."""
    import csv

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ldir_pl.config import register_resolvers
    from ldir_pl.data.base import split_record
    from ldir_pl.models.bundle import save_prior
    from ldir_pl.models.intensity import DEFAULT as INTENSITY
    from ldir_pl.models.latent_diffusion import LatentDiffusionModule

    register_resolvers()
    run = ckpt.parent.parent.parent
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = LatentDiffusionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    epoch, step = int(state["epoch"]), int(state["global_step"])
    before = module.minutes_before
    minutes = max(float(r["val/train_minutes"]) for log in run.glob("ldm/logs/*/metrics.csv")
                  for r in csv.DictReader(log.open()) if r.get("val/train_minutes") and int(r["epoch"]) <= epoch)
    metric = str(cfg.get("optimized_metric") or "val/loss")
    best = next(iter(state["callbacks"].values())).get("best_model_score")
    start = json.loads((Path(str(cfg.init_from)) / "ldir_prior.json").read_text()) if cfg.get("init_from") else {}
    history = [*start.get("training_history", []),
               {"stage": "ldm", "experiment": cfg.experiment_name, "date": stamp().split(",")[0],
                "minutes": round(minutes - before, 1), "epochs": epoch + 1,
                "images_seen": step * int(cfg.stages.ldm.data.get("batch_size", cfg.data.batch_size)), "where": where,
                metric: None if best is None else float(best)}]
    data = instantiate(OmegaConf.merge(cfg.data, cfg.stages.ldm.get("data") or {}), _convert_="all")
    meta = {"training_history": history, "training_data": split_record(data), "image_size": int(cfg.data.image_size),
            "intensity_transform": INTENSITY.as_dict(), "experiment": cfg.experiment_name,
            "scaling_factor": float(module.scaling_factor), "stopped_early": {"checkpoint": ckpt.name, "epoch": epoch},
            "training_config": OmegaConf.to_container(cfg, resolve=False)}
    return save_prior(run / "prior", module.export_vae(), module.export_unet(), module.noise_scheduler, meta)


#: what a bundle folder holds (the packaged folder's README.md and sample grid stay)
BUNDLE_PARTS = ("vqvae", "unet", "scheduler", "model_index.json", "ldir_prior.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an ldir-train output folder (holding prior/); without it, only the tables are "
                                  "written from the packaged folder")
    ap.add_argument("--ckpt", default=None, help="a latent-stage checkpoint of a run stopped before its export: "
                                                  "its bundle is written to the run's prior/ first")
    ap.add_argument("--where", default="CPU", help="where the run trained (with --ckpt: the checkpoint does not say)")
    ap.add_argument("--name", default="ct256")
    ap.add_argument("--dest", default=None, help="where the packaged prior goes (default: ldir_pl/priors/NAME)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--out", default="outputs/package_prior", help="where the tables go")
    ap.add_argument("--max-images", type=int, default=None, help="test slices of the VAE fidelity (default: all)")
    args = ap.parse_args()
    dest = Path(args.dest) if args.dest else ROOT / "ldir_pl" / "priors" / args.name
    cmd = f"`python experiments/package_prior.py {' '.join(sys.argv[1:])}` ({stamp()})".replace(str(ROOT) + "/", "")
    if args.ckpt:
        args.run = str(bundle_from_checkpoint(Path(args.ckpt), args.where).parent)
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
