"""What people read after a reconstruction run: metrics.csv, summary.json, PNG panels, PSNR-vs-views plots."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ldir_pl.atomic import atomic_path, write_text  # noqa: E402

CSV_FIELDS = ("id", "method", "psnr", "ssim", "seconds", "peak_mem_mb")
#: CT display windows (level, width) in HU: what a radiologist reads a slice in (``recon.window``)
WINDOWS = {"soft_tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}


def window_range(window: str) -> tuple[float, float]:
    """``(vmin, vmax)`` of a named CT window in image units (x = (HU + 1024) / 4096)."""
    from ldir_pl.errors import ConfigError

    if window not in WINDOWS:
        raise ConfigError(f"recon.window={window!r}: expected one of {sorted(WINDOWS)}")
    level, width = WINDOWS[window]
    return (level - width / 2 + 1024.0) / 4096.0, (level + width / 2 + 1024.0) / 4096.0
#: per-volume metrics besides the axial psnr / ssim (recon.volume=true)
VOLUME_FIELDS = ("psnr_coronal", "ssim_coronal", "psnr_sagittal", "ssim_sagittal")


def rows_from_prediction(pred: Mapping) -> list[dict]:
    """Flatten one predict_step output into per-image (or per-volume), per-method rows; ``seconds`` is per slice."""
    rows = []
    for method in pred["recon"]:
        m = pred["metrics"].get(method, {})
        for i, image_id in enumerate(pred["id"]):
            row = {"id": image_id, "method": method, "seconds": pred["seconds"][method],
                   "peak_mem_mb": pred["peak_mem_mb"][method]}
            row.update({k: m[k][i] if k in m else math.nan for k in ("psnr", "ssim", *VOLUME_FIELDS)})
            rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping], path: Path) -> None:
    """One row per image and method; volume runs add the coronal and sagittal metrics."""
    fields = CSV_FIELDS + tuple(k for k in VOLUME_FIELDS if any(not math.isnan(float(r.get(k, math.nan)))
                                                                 for r in rows))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})


def summarize(rows: Sequence[Mapping]) -> dict[str, dict]:
    """Per method: mean PSNR/SSIM (None without ground truth; volumes add coronal / sagittal), seconds per slice,
    peak memory, n (images or volumes)."""
    by_method: dict[str, list[Mapping]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    out = {}
    for method, rs in by_method.items():
        def mean(key: str, rs=rs) -> float | None:
            vals = [float(r[key]) for r in rs if key in r and not math.isnan(float(r[key]))]
            return float(np.mean(vals)) if vals else None
        out[method] = {"psnr": mean("psnr"), "ssim": mean("ssim"), "seconds_per_image": mean("seconds"),
                       "peak_mem_mb": max(float(r["peak_mem_mb"]) for r in rs), "n": len(rs)}
        out[method].update({k: mean(k) for k in VOLUME_FIELDS if mean(k) is not None})
    return out


def format_table(summary: Mapping[str, Mapping], title: str = "") -> str:
    volume = any("psnr_coronal" in s for s in summary.values())
    lines = [title] if title else []
    extra = f"{'cor. dB':>9}{'cor. SSIM':>10}" if volume else ""
    lines.append(f"{'method':<12}{'PSNR dB':>9}{'SSIM':>8}{extra}{'s/img':>9}{'peak MB':>9}{'n':>5}")
    for method, s in summary.items():
        def fmt(key: str, digits: int, s=s) -> str:
            return f"{s[key]:.{digits}f}" if s.get(key) is not None else "-"
        cells = f"{fmt('psnr_coronal', 2):>9}{fmt('ssim_coronal', 3):>10}" if volume else ""
        lines.append(f"{method:<12}{fmt('psnr', 2):>9}{fmt('ssim', 3):>8}{cells}{s['seconds_per_image']:>9.3f}"
                     f"{s['peak_mem_mb']:>9.1f}{s['n']:>5}")
    return "\n".join(lines)


def save_figure(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def save_panel(path: Path, image_id: str, truth: np.ndarray | None, recons: Mapping[str, np.ndarray],
               metrics: Mapping[str, tuple[float, float]] | None = None, error_range: float = 0.1,
               window: str = "soft_tissue") -> None:
    """Ground truth | each method in a CT window, and below each method its absolute error map (when truth
    exists)."""
    vmin, vmax = window_range(window)
    cols = (1 if truth is not None else 0) + len(recons)
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    c0 = 0
    if truth is not None:
        axes[0, 0].imshow(truth, cmap="gray", vmin=vmin, vmax=vmax)
        axes[0, 0].set_title(f"ground truth\n{window.replace('_', ' ')} window", fontsize=9)
        axes[1, 0].axis("off")
        c0 = 1
    for j, (name, img) in enumerate(recons.items()):
        ax = axes[0, c0 + j]
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
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
    save_figure(fig, path, dpi=90)


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
    save_figure(fig, path, dpi=110)


def write_json(obj, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_volume_panel(path: Path, name: str, truth: np.ndarray | None, recons: Mapping[str, np.ndarray],
                      spacing: tuple[float, float, float], metrics: Mapping[str, Mapping[str, float]] | None = None,
                      error_range: float = 0.1, window: str = "soft_tissue") -> None:
    """Axial, coronal and sagittal planes through the volume's centre (``(S, H, W)`` arrays) in a CT window,
    ground truth | each method, each view followed by its error maps; planes drawn with their true aspect
    (``spacing`` = row, column, slice mm) in rows as tall as the planes, so thin slabs leave no empty bands."""
    vmin, vmax = window_range(window)
    views = {"axial": lambda v: v[v.shape[0] // 2], "coronal": lambda v: v[:, v.shape[1] // 2, :],
             "sagittal": lambda v: v[:, :, v.shape[2] // 2]}
    aspect = {"axial": spacing[0] / spacing[1], "coronal": spacing[2] / spacing[1], "sagittal": spacing[2] / spacing[0]}
    ref = truth if truth is not None else next(iter(recons.values()))
    shape = {view: cut(ref).shape for view, cut in views.items()}
    height = {view: shape[view][0] * aspect[view] / shape[view][1] for view in views}  # plane height / width
    per_view = 2 if truth is not None else 1
    ratios = [height[view] for view in views for _ in range(per_view)]
    cols = (1 if truth is not None else 0) + len(recons)
    col_w = 2.6
    fig, axes = plt.subplots(len(ratios), cols, figsize=(col_w * cols, col_w * sum(ratios) + 0.35 * len(ratios) + 0.4),
                             squeeze=False, gridspec_kw={"height_ratios": ratios})
    for v, (view, cut) in enumerate(views.items()):
        r = v * per_view
        images = ({"ground truth": truth} if truth is not None else {}) | dict(recons)
        for c, (label, vol) in enumerate(images.items()):
            ax = axes[r, c]
            origin = "upper" if view == "axial" else "lower"  # slices run inferior to superior: head up
            ax.imshow(cut(vol), cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect[view], origin=origin)
            title = f"{label} ({view})"
            if metrics and label in metrics:
                key = "psnr" if view == "axial" else f"psnr_{view}"
                if metrics[label].get(key) is not None:
                    title += f", {metrics[label][key]:.2f} dB"
            ax.set_title(title, fontsize=7)
            if truth is not None:
                err = axes[r + 1, c]
                if label != "ground truth":
                    err.imshow(np.abs(cut(vol) - cut(truth)), cmap="magma", vmin=0, vmax=error_range,
                               aspect=aspect[view], origin=origin)
                    err.set_title(f"|error| (0-{error_range})", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.suptitle(f"{name} ({window.replace('_', ' ')} window)", fontsize=9)
    fig.tight_layout(h_pad=0.3, w_pad=0.3)
    save_figure(fig, path, dpi=80)
