"""What people read after a reconstruction run: metrics.csv, summary.json, PNG panels, PSNR-vs-views plots."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CSV_FIELDS = ("id", "method", "psnr", "ssim", "seconds", "peak_mem_mb")


def rows_from_prediction(pred: Mapping) -> list[dict]:
    """Flatten one predict_step output into per-image, per-method rows."""
    rows = []
    for method, _recon in pred["recon"].items():
        m = pred["metrics"].get(method, {})
        for i, image_id in enumerate(pred["id"]):
            rows.append({
                "id": image_id, "method": method,
                "psnr": m["psnr"][i] if m else math.nan, "ssim": m["ssim"][i] if m else math.nan,
                "seconds": pred["seconds"][method], "peak_mem_mb": pred["peak_mem_mb"][method],
            })
    return rows


def write_csv(rows: Iterable[Mapping], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_FIELDS})


def summarize(rows: Sequence[Mapping]) -> dict[str, dict]:
    """Per method: mean PSNR/SSIM (NaN without ground truth), seconds per image, peak memory, n."""
    by_method: dict[str, list[Mapping]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = {}
    for method, rs in by_method.items():
        def mean(key: str, rs=rs) -> float | None:
            vals = [float(r[key]) for r in rs if not math.isnan(float(r[key]))]
            return float(np.mean(vals)) if vals else None
        out[method] = {"psnr": mean("psnr"), "ssim": mean("ssim"), "seconds_per_image": mean("seconds"),
                       "peak_mem_mb": max(float(r["peak_mem_mb"]) for r in rs), "n": len(rs)}
    return out


def format_table(summary: Mapping[str, Mapping], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'method':<12}{'PSNR dB':>9}{'SSIM':>8}{'s/img':>9}{'peak MB':>9}{'n':>5}")
    for method, s in summary.items():
        psnr = f"{s['psnr']:.2f}" if s["psnr"] is not None else "-"
        ssim = f"{s['ssim']:.3f}" if s["ssim"] is not None else "-"
        lines.append(f"{method:<12}{psnr:>9}{ssim:>8}{s['seconds_per_image']:>9.3f}{s['peak_mem_mb']:>9.1f}"
                     f"{s['n']:>5}")
    return "\n".join(lines)


def save_panel(path: Path, image_id: str, truth: np.ndarray | None, recons: Mapping[str, np.ndarray],
               metrics: Mapping[str, tuple[float, float]] | None = None, error_range: float = 0.1) -> None:
    """Ground truth | each method, and below each method its absolute error map (when truth exists)."""
    cols = (1 if truth is not None else 0) + len(recons)
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    c0 = 0
    if truth is not None:
        axes[0, 0].imshow(truth, cmap="gray", vmin=0, vmax=truth.max() or 1)
        axes[0, 0].set_title("ground truth")
        axes[1, 0].axis("off")
        c0 = 1
    vmax = truth.max() if truth is not None and truth.max() > 0 else 1
    for j, (name, img) in enumerate(recons.items()):
        ax = axes[0, c0 + j]
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax)
        label = name
        if metrics and name in metrics:
            label += f"\n{metrics[name][0]:.2f} dB / {metrics[name][1]:.3f}"
        ax.set_title(label, fontsize=9)
        if truth is not None:
            axes[1, c0 + j].imshow(np.abs(img - truth), cmap="magma", vmin=0, vmax=error_range)
            axes[1, c0 + j].set_title(f"|error| (0-{error_range})", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(image_id, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_metric_vs_views(results: Mapping[str, Mapping[int, float]], path: Path, metric: str = "PSNR (dB)") -> None:
    """``results[method][num_views] = value`` -> a line plot."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for method, by_views in sorted(results.items()):
        views = sorted(by_views)
        values = [by_views[v] for v in views]
        style = "--" if len(set(values)) == 1 and len(values) > 1 else "-"  # geometry-free reference rows
        ax.plot(views, values, style, marker="o", label=method)
    ax.set_xlabel("number of views")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
