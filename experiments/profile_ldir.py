"""Where LDIR's time goes on this machine: each network pass timed alone, and the sampler timed with one part
removed at a time, on the same slices.

    python experiments/profile_ldir.py --batch 2 --images 4 --out outputs/profile_ldir
    python experiments/profile_ldir.py -- num_steps=30 guidance.final_steps=40   # profile another setting
    python experiments/profile_ldir.py --device cuda --batch 32 -- precision=bf16    # on a GPU

Part 1 times, per slice at the given batch: UNet forward, UNet forward + backward to its input, decoder forward,
decoder forward + backward, encoder forward, one anchored-TV refinement. Part 2 runs ``sampler=ldir`` (with the
extra overrides) on validation slices, then again without the final steps, without the refinement, with the
gradient taken w.r.t. z0 (no UNet backward) and without guidance, and reports each difference. Writes
``OUT/profile.json`` and ``OUT/profile.md`` and prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablation import stamp  # noqa: E402


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 3) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="prior bundle (default: the packaged one)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--views", type=int, default=23)
    ap.add_argument("--batch", type=int, default=2, help="slices per call (the networks' chunk is the sampler's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out", default="outputs/profile_ldir")
    ap.add_argument("overrides", nargs="*", help="sampler overrides of the profiled setting (after --)")
    args = ap.parse_args()

    import torch
    from hydra.utils import instantiate

    from ldir_pl.config import ROOT_KEYS, compose_sampler, load_sampler

    base = ["data=dicom", f"data.root={args.data_root}", "data.predict_split=val", f"data.max_images={args.images}",
            f"physics.num_views={args.views}", *([f"prior.path={args.prior}"] if args.prior else []),
            *(o for o in args.overrides if o.startswith(ROOT_KEYS))]  # data / physics settings: the data too
    cfg = compose_sampler("ldir", base)
    base.append("progress=false")
    device = torch.device(args.device)
    physics, dm = instantiate(cfg.physics), instantiate(cfg.data)
    items = dm.items("val")
    ids = [i for i, _ in items]
    x = torch.stack([load() for _, load in items])
    y = physics.measure(x, ids)
    physics.to(device)
    x, y = x.to(device), y.to(device)
    ldir = load_sampler("ldir", overrides=[*base, *args.overrides]).to(device)
    prior, b = ldir.prior, args.batch
    z = torch.randn(b, *prior.latent_shape, device=device)
    t = torch.full((b,), 300, device=device)
    zg = z.clone().requires_grad_(True)
    parts = {
        "UNet forward": lambda: prior.unet(z, t),
        "UNet forward + backward": lambda: torch.autograd.grad(prior.unet(zg, t).sample.sum(), zg),
        "decoder forward": lambda: prior.decode(z),
        "decoder forward + backward": lambda: torch.autograd.grad(prior.decode(zg).sum(), zg),
        "encoder forward": lambda: prior.encode(x[:b]),
        "TV-anchored refinement": lambda: ldir.refine(x[:b], y[:b], physics) if ldir.refine else None,
    }
    per_slice = {}
    for name, fn in parts.items():
        with torch.enable_grad() if "backward" in name else torch.no_grad():
            per_slice[name] = timed(fn, device) / b
    variants = {"setting": [], "no final steps": ["guidance.final_steps=0"], "no refinement": ["refine=null"],
                "gradient w.r.t. z0": ["guidance.wrt=z0"], "no guidance": ["guidance.step_size.lr=0",
                                                                            "guidance.final_steps=0"]}
    runs = {}
    load_sampler("ldir", overrides=[*base, *args.overrides]).reconstruct(y[:b], physics, ids[:b])  # warm-up
    for name, extra in variants.items():
        sampler = load_sampler("ldir", overrides=[*base, *args.overrides, *extra])
        start = time.perf_counter()
        for i in range(0, len(ids), b):
            sampler.reconstruct(y[i:i + b], physics, ids[i:i + b])
        sync(device)
        runs[name] = (time.perf_counter() - start) / len(ids)
    total = runs["setting"]
    shares = {"final latent steps (decoder fwd+bwd)": total - runs["no final steps"],
              "refinement": total - runs["no refinement"],
              "UNet backward (zt gradient)": total - runs["gradient w.r.t. z0"],
              "guidance in the DDIM steps (decoder fwd+bwd, UNet bwd)": runs["no final steps"] - runs["no guidance"],
              "the rest (warm start, UNet forwards, final decode)": runs["no guidance"]
              - (total - runs["no refinement"])}
    result = {"device": str(device), "threads": torch.get_num_threads(), "batch": b, "n": len(ids), "per_slice_pass_s": per_slice,
              "runs_s_per_slice": runs, "shares_s_per_slice": shares, "overrides": args.overrides}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    md = [f"LDIR profile ({stamp()}; {where}, batch {b}, {len(ids)} validation slices, "
          f"{args.views} views); `python experiments/profile_ldir.py {' '.join(sys.argv[1:])}`", "",
          "| pass (per slice) | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in per_slice.items()]
    md += ["", "| sampler run | s/slice |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in runs.items()]
    md += ["", "| where the time goes | s/slice | share |", "|---|---|---|"]
    md += [f"| {k} | {v:.2f} | {100 * v / total:.0f}% |" for k, v in shares.items()]
    (out / "profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
