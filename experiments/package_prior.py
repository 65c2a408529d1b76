"""Ship a trained prior with the package: fp16 safetensors under ``ldir_pl/priors/<name>/`` (``from_pretrained``
loads them in fp32), its ``train_summary.json`` and training config, and the VAE's fidelity on held-out patients.

    python experiments/package_prior.py --run outputs/ct_cpu_long --name ct256
    python experiments/package_prior.py --name ct256      # only rewrite its tables from the packaged JSON

Prints the folder's size (the package keeps it under 24 MB) and decode(encode(x)) PSNR / SSIM on the ct-dicom
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


def vae_fidelity(prior: str | Path, data_root: str, split: str) -> dict:
    """Mean PSNR / SSIM of decode(encode(x)) (posterior mean) on the split's slices, with n."""
    import torch
    from hydra.utils import instantiate

    from ldir_pl.apps.sampler_configs import compose_sampler
    from ldir_pl.metrics import image_metrics
    from ldir_pl.models.bundle import PriorBundle

    bundle = PriorBundle.from_pretrained(prior)
    dm = instantiate(compose_sampler("fbp", ["data=dicom", f"data.root={data_root}"]).data)
    items = dm.items(split)
    psnr, ssim = [], []
    with torch.no_grad():
        for i in range(0, len(items), 4):
            x = torch.stack([load() for _, load in items[i:i + 4]])
            m = image_metrics(bundle.decode(bundle.encode(x)).clamp(0, 1), x)
            psnr += m["psnr"].tolist()
            ssim += m["ssim"].tolist()
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "n": len(psnr)}


def write_tables(dest: Path, cmd: str) -> None:
    """``outputs/package_prior/{training,vae_fidelity}.md`` from the packaged folder's JSON files."""
    out = ROOT / "outputs" / "package_prior"
    out.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    summary = json.loads((dest / "train_summary.json").read_text())
    fidelity = json.loads((dest / "vae_fidelity.json").read_text())
    (out / "training.md").write_text("\n".join(
        [f"Training of `{dest.name}` ({size / 1e6:.1f} MB on disk); {cmd}", "",
         "| stage | metric (validation patients) | minutes | images/s | torch threads |", "|---|---|---|---|---|"]
        + [f"| {stage} | {', '.join(f'{k} {v:.4g}' for k, v in r.items() if k.startswith('val/'))} | "
           f"{r['seconds'] / 60:.0f} | {r['images_per_s']:.1f} | {r.get('torch_threads', '-')} |"
           for stage, r in summary.items()]) + "\n")
    (out / "vae_fidelity.md").write_text("\n".join(
        [f"decode(encode(x)) on the ct-dicom test patients; {cmd}", "", "| weights | PSNR | SSIM | n |",
         "|---|---|---|---|"]
        + [f"| {k} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['n']} |" for k, v in fidelity.items()]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an ldir-train output folder (holding prior/ and train_summary.json); "
                                  "without it, only the tables are written from the packaged folder")
    ap.add_argument("--name", default="ct256")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    args = ap.parse_args()
    dest = ROOT / "ldir_pl" / "priors" / args.name
    cmd = f"`python experiments/package_prior.py {' '.join(sys.argv[1:])}` ({stamp()})"
    if args.run is None:
        write_tables(dest, cmd)
        return

    from ldir_pl.models.bundle import PriorBundle

    run = Path(args.run)
    for sub in ("vqvae", "unet", "scheduler"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    PriorBundle.from_pretrained(run / "prior").save_pretrained(dest, half=True)
    shutil.copy(run / "train_summary.json", dest / "train_summary.json")
    meta = dest / "ldir_prior.json"  # the training config, with this machine's folders made relative
    text = meta.read_text().replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")
    meta.write_text(text)
    fidelity = {"fp32": vae_fidelity(run / "prior", args.data_root, "test"),
                "fp16": vae_fidelity(dest, args.data_root, "test")}
    (dest / "vae_fidelity.json").write_text(json.dumps(fidelity, indent=2) + "\n")
    write_tables(dest, cmd)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"folder": str(dest), "megabytes": size / 1e6, "vae_test": fidelity}, indent=2))


if __name__ == "__main__":
    main()
