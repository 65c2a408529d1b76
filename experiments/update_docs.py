"""Put the tables the experiment scripts wrote into the README and docs, so no table is copied by hand.

    python experiments/update_docs.py            # copy new script outputs into docs/results/, refresh every block
    python experiments/update_docs.py --check    # exit 1 if a block differs from docs/results/

``docs/results/<name>.md`` keeps each table as its script wrote it (it opens with the date, the commit and the
command). A block in a markdown file reads ``<!-- table: <name> -->`` ... ``<!-- /table -->``; its content is
replaced by that file. ``SOURCES`` says which script output feeds which name (the scripts' default ``--out``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
SOURCES = {
    "tune_tv": "outputs/tune_tv/tune_tv.md",
    "tune_tv_ops": "outputs/tune_tv_ops/tune_tv.md",
    "tune_tv3d": "outputs/tune_tv3d/tune_tv3d.md",
    "sparse_view": "outputs/sparse_view_table/table.md",
    "ablation": "outputs/ablation/ablation.md",
    "ablation_val": "outputs/ablation_val/ablation.md",
    "operators": "outputs/operator_table/table.md",
    "volumes": "outputs/volume_table/volume_table.md",
    "volumes_val": "outputs/volume_table_val/volume_table.md",
    "profile": "outputs/profile_ldir/profile.md",
    "speed": "outputs/tune_sampler/speed.md",
    "speed_final30": "outputs/tune_sampler_final30/speed.md",
    "tune_lam": "outputs/tune_sampler_lam/speed.md",
    "tune_paper": "outputs/tune_paper/speed.md",
    "training": "outputs/package_prior/training.md",
    "vae_fidelity": "outputs/package_prior/vae_fidelity.md",
    "prior_quality": "outputs/prior_quality/prior_quality.md",
    "gpu_check": "outputs/gpu_check/gpu_check.md",
    "memory_budget": "outputs/memory_budget/memory_budget.md",
}
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
DOCS = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md"))),
        "ldir_pl/priors/ct256/README.md"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not args.check:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name, src in SOURCES.items():
            if (ROOT / src).is_file():  # paths of this checkout become relative ones
                text = (ROOT / src).read_text().replace(str(ROOT) + "/", "")
                (RESULTS / f"{name}.md").write_text(text)
    stale = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.is_file():
            continue
        old = path.read_text()

        def fill(m: re.Match, doc: str = doc) -> str:
            table = RESULTS / f"{m.group('name')}.md"
            if not table.is_file():
                print(f"{doc}: no docs/results/{m.group('name')}.md yet (run its script, then this one)")
                return m.group(0)
            return m.group(1) + table.read_text().strip() + "\n" + m.group(4)

        new = BLOCK.sub(fill, old)
        if new != old:
            stale.append(doc)
            if not args.check:
                path.write_text(new)
                print(f"updated {doc}")
    if args.check and stale:
        sys.exit(f"out of date with docs/results/: {', '.join(stale)}")


if __name__ == "__main__":
    main()
