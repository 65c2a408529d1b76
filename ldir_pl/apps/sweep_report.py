"""Aggregate a ``ldir-reconstruct -m`` sweep: one table and one PSNR-vs-views plot over all jobs.

Each job folder holds ``summary.json`` (per method) and ``run_info.json`` (geometry, methods). Methods
that run in several jobs at the same number of views (e.g. the FBP/TV baselines next to every sampler)
are deterministic, so the first job's figures are kept. Re-running it after every job keeps the sweep's
report current while the sweep is still going.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ldir_pl.apps.report import plot_metric_vs_views, write_json
from ldir_pl.errors import MissingPathError

Results = dict[str, dict[int, dict]]  # method -> num_views -> summary entry


def collect_sweep(sweep_dir: Path) -> Results:
    """``results[method][num_views]`` from every job folder below ``sweep_dir`` that has finished."""
    results: Results = {}
    for summary_path in sorted(Path(sweep_dir).glob("*/summary.json")):
        info_path = summary_path.with_name("run_info.json")
        if not info_path.exists():
            continue
        views = json.loads(info_path.read_text())["physics"].get("num_views")
        if views is None:  # not a CT job: no views axis to tabulate
            continue
        views = int(views)
        for method, entry in json.loads(summary_path.read_text()).items():
            results.setdefault(method, {}).setdefault(views, entry)
    return results


def markdown_table(results: Mapping[str, Mapping[int, Mapping]], extra_rows: Mapping[str, Mapping[int, Mapping]] = ()
                   ) -> str:
    """Methods as rows, views as columns; cells ``PSNR / SSIM`` plus seconds per image."""
    rows = {**results, **dict(extra_rows)}
    views = sorted({v for by_views in rows.values() for v in by_views}, reverse=True)
    head = "| method | " + " | ".join(f"{v} views: PSNR dB / SSIM" for v in views) + " | s/image | peak MB |"
    lines = [head, "|---" * (len(views) + 3) + "|"]
    for method, by_views in rows.items():
        cells = []
        for v in views:
            e = by_views.get(v)
            if e is None or e.get("psnr") is None:
                cells.append("-")
            else:
                ssim = f"{e['ssim']:.3f}" if e.get("ssim") is not None else "-"
                cells.append(f"{e['psnr']:.2f} / {ssim}")
        secs = [e["seconds_per_image"] for e in by_views.values() if e.get("seconds_per_image") is not None]
        mems = [e["peak_mem_mb"] for e in by_views.values() if e.get("peak_mem_mb") is not None]
        sec = f"{sum(secs) / len(secs):.2f}" if secs else "-"
        mem = f"{max(mems):.0f}" if mems else "-"
        ns = sorted({e.get("n") for e in by_views.values() if e.get("n")})
        label = method + (f" (n={ns[0]})" if len(ns) == 1 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sec} | {mem} |")
    return "\n".join(lines) + "\n"


def write_sweep_report(sweep_dir: Path, extra_rows: Mapping[str, Mapping[int, Mapping]] = ()) -> Results:
    """Writes ``sweep_summary.json``, ``table.md`` and ``psnr_vs_views.png`` into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    results = collect_sweep(sweep_dir)
    if not results:
        raise MissingPathError(f"no finished jobs (summary.json + run_info.json) below {sweep_dir}")
    all_rows = {**results, **dict(extra_rows)}
    write_json({m: {str(v): e for v, e in bv.items()} for m, bv in all_rows.items()}, sweep_dir / "sweep_summary.json")
    (sweep_dir / "table.md").write_text(markdown_table(results, extra_rows))
    psnr = {m: {v: e["psnr"] for v, e in bv.items() if e.get("psnr") is not None} for m, bv in all_rows.items()}
    psnr = {m: bv for m, bv in psnr.items() if bv}
    if psnr and max(len(bv) for bv in psnr.values()) > 1:
        plot_metric_vs_views(psnr, sweep_dir / "psnr_vs_views.png")
    return results


__all__ = ["collect_sweep", "markdown_table", "write_sweep_report"]
