"""Compare sampler settings side by side on the *validation* patients (never the test ones).

    python experiments/tune_sampler.py --prior outputs/ct_cpu/prior --views 23 --max-images 6 \
        --candidate "" --candidate "sampler.refine.lam=0.005" --candidate "sampler=ldir_paper"

Each candidate is a space-separated list of Hydra overrides on top of ``sampler=ldir`` (the app's config,
so what wins here is what ``ldir-reconstruct`` runs). Measurements are simulated once per view count with
the app's seeded noise; FBP and TV run on the same measurements. Prints PSNR / SSIM / s per image and the
gain over TV for every candidate, and writes ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ldir_pl.apps.conf_dir import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("reconstruct", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", default=None, help="prior bundle (default: the packaged one)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "ct-dicom"))
    ap.add_argument("--views", type=int, nargs="+", default=[23])
    ap.add_argument("--max-images", type=int, default=6)
    ap.add_argument("--candidate", action="append", default=None,
                    help="Hydra overrides (space-separated) for one candidate; repeat the flag")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import torch
    from hydra.utils import instantiate

    from ldir_pl.apps.sampler_configs import load_sampler
    from ldir_pl.metrics import image_metrics

    candidates = args.candidate if args.candidate is not None else [""]
    results = []
    for views in args.views:
        base = ["data=dicom", f"data.root={args.data_root}", "data.predict_split=val",
                f"data.max_images={args.max_images}", f"physics.num_views={views}",
                *([f"prior.path={args.prior}"] if args.prior else [])]
        cfg = compose(base + ["sampler=fbp"])
        physics = instantiate(cfg.physics)
        dm = instantiate(cfg.data)
        items = dm.items("val")
        ids = [i for i, _ in items]
        x = torch.stack([load() for _, load in items])
        y = physics.measure(x, ids)
        ref = {}
        for method in (load_sampler("fbp"), load_sampler("tv", overrides=[f"physics.num_views={views}"])):
            m = image_metrics(method.reconstruct(y, physics, ids), x)
            ref[method.name] = {k: float(v.mean()) for k, v in m.items()}
            print(f"V={views} n={len(ids)} {method.name}: {ref[method.name]['psnr']:.2f} / "
                  f"{ref[method.name]['ssim']:.3f}", flush=True)
        for cand in candidates:
            over = shlex.split(cand)
            sampler_group = [o for o in over if o.startswith("sampler=")] or ["sampler=ldir"]
            cfg = compose(base + sampler_group + [o for o in over if not o.startswith("sampler=")]
                          + ["sampler.progress=false"])
            sampler = instantiate(cfg.sampler)
            start = time.perf_counter()
            out = torch.cat([sampler.reconstruct(y[i:i + 2], physics, ids[i:i + 2]) for i in range(0, len(ids), 2)])
            sec = (time.perf_counter() - start) / len(ids)
            m = {k: float(v.mean()) for k, v in image_metrics(out, x).items()}
            row = {"views": views, "candidate": cand or "(defaults)", "n": len(ids), **m, "s_per_image": sec,
                   "tv_psnr": ref["tv"]["psnr"], "tv_ssim": ref["tv"]["ssim"], "fbp_psnr": ref["fbp"]["psnr"]}
            results.append(row)
            print(f"V={views} {row['candidate']}: {m['psnr']:.2f} / {m['ssim']:.3f} "
                  f"(TV {m['psnr'] - ref['tv']['psnr']:+.2f} dB, {m['ssim'] - ref['tv']['ssim']:+.3f}) "
                  f"{sec:.1f} s/image", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
