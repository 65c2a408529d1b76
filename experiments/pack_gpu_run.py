"""Pack what a GPU machine without network access needs to continue training the CT prior: the training and
validation slices as one compressed file (int16 HU, ids, patients / volumes), the wheels its Python lacks
(``../shared/gpu-kit/prepare.sh``), and the command it runs.

    python experiments/pack_gpu_run.py --out gpu_run                 # data only
    python experiments/pack_gpu_run.py --out gpu_run --kit 3.12      # and the wheels for Python 3.12

Then, on the GPU machine, in a copy of the project with ``gpu_run/`` beside it::

    bash gpu_run/train.sh OUT      # continues the packaged prior (experiment=ct_gpu), writes OUT/prior

and back here ``python experiments/package_prior.py --run OUT --name ct256`` packages the result (fp16). Test
patients and the held-out volumes are never packed: they stay on the machine that evaluates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

TRAIN_SH = """#!/usr/bin/env bash
# Continue the packaged CT prior on this GPU from the packed slices; OUT gets the run and OUT/prior the bundle.
set -euo pipefail
out=${{1:?usage: train.sh OUT [more ldir-train overrides]}}; shift
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$here/.gpu-kit/env.sh" ] && source "$here/.gpu-kit/env.sh"
python3 -m ldir_pl.apps.train experiment=ct_gpu data=packed data.path="$here/{data}" output_dir="$out" "$@"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_run")
    ap.add_argument("--data", default="ct_mix", help="the data config whose train / val splits are packed")
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--kit", default=None, metavar="PYTHON_VERSION", help="also build the wheels (gpu-kit/prepare.sh)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the data config (after --)")
    args = ap.parse_args()

    from hydra.utils import instantiate

    from ldir_pl.config import compose
    from ldir_pl.data.packed import pack

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose("train", [f"data={args.data}", f"paths.data_dir={args.data_dir}", *args.overrides])
    source = instantiate(cfg.data, _convert_="all")
    source.setup()
    name = "ct_train.npz"
    counts = pack(out / name, source, ("train", "val"))
    (out / "train.sh").write_text(TRAIN_SH.format(data=name))
    (out / "train.sh").chmod(0o755)
    if args.kit:
        subprocess.run([str(SHARED / "gpu-kit" / "prepare.sh"), args.kit, str(out / ".gpu-kit")], cwd=ROOT, check=True)
    size = {p.name: p.stat().st_size / 2**20 for p in out.iterdir() if p.is_file()}
    kit = sum(p.stat().st_size for p in (out / ".gpu-kit").rglob("*") if p.is_file()) / 2**20 \
        if (out / ".gpu-kit").is_dir() else 0.0
    print(json.dumps({"folder": str(out), "slices": counts, "MiB": {**size, ".gpu-kit": kit}}, indent=2))


if __name__ == "__main__":
    main()
