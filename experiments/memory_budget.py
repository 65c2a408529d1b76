"""AccUDNN's experiment as the paper frames it: under a device-memory budget, the largest batch each strategy
trains and the best throughput it reaches, side by side in one run.

    python experiments/memory_budget.py --device cuda --budgets-gb 8 12 --models resnet152 unet --full
    python experiments/memory_budget.py --device cpu --budgets-gb 0.05 0.1 --models unet      # the same, tiny

Strategies: no offload, activation checkpointing, ``save_on_cpu`` (every saved tensor to pinned host memory),
and the swap-out engine at a quarter of the saved activations with the batch chosen for throughput (what
``SwapOutCallback`` + ``BatchSizeLRSearch`` do in training). For each: batches are doubled from ``--start`` until a
step does not fit, then bisected; every fitting batch is timed, and the table gives the largest one and the best
samples/s (with its batch). On CUDA the budget is ``torch.cuda.set_per_process_memory_fraction`` and a batch fits
when its step raises no out-of-memory error; on a CPU a batch fits when its step's peak resident growth stays
under the budget (the stand-in the CPU tests use). Writes ``OUT/memory_budget.{json,md}``; ``update_docs.py``
puts the table in ``docs/callbacks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from ablation import stamp  # noqa: E402
from bench_swap import MB, Runner, make_task, saved_bytes, with_checkpointing  # noqa: E402

STRATEGIES = ("none", "checkpoint", "save_on_cpu", "swap+search")


def trial(model_name: str, strategy: str, batch: int, args, device: torch.device) -> dict[str, Any] | None:
    """One batch: timed steps and peak memory, or None when it does not fit the budget."""
    try:
        model, label, loss_fn = make_task(model_name, batch, args.size, args.full, device)
        model = model.to(device)
        budget = None
        if strategy == "checkpoint":
            model = with_checkpointing(model)
        if strategy == "swap+search":
            budget = max(1, int(args.swap_fraction * saved_bytes(model, loss_fn)))
        runner = Runner(model, loss_fn, "swap" if strategy == "swap+search" else strategy, device, batch, budget,
                        amp=args.amp)
        for _ in range(args.warmup):
            runner.step()
        for _ in range(args.steps):
            runner.timed()
        result = runner.result()
    except torch.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type != "cuda" and result["peak_mb"] > args.budget_bytes / MB:
        return None
    return {"batch": batch, "samples_per_s": result["samples_per_s"], "peak_mb": result["peak_mb"], "label": label}


def search(model_name: str, strategy: str, args, device: torch.device) -> dict[str, Any]:
    """Doubling, then bisection between the largest fitting and the smallest failing batch."""
    fits: dict[int, dict] = {}
    batch, failed = args.start, None
    while batch <= args.max_batch:
        r = trial(model_name, strategy, batch, args, device)
        if r is None:
            failed = batch
            break
        fits[batch] = r
        batch *= 2
    lo = max(fits) if fits else 0
    hi = failed or 0
    while hi and hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        r = trial(model_name, strategy, mid, args, device)
        if r is None:
            hi = mid
        else:
            fits[mid], lo = r, mid
    if not fits:
        return {"largest_batch": 0, "best_samples_per_s": 0.0, "best_batch": 0, "trials": {}}
    best = max(fits.values(), key=lambda r: r["samples_per_s"])
    return {"largest_batch": max(fits), "best_samples_per_s": best["samples_per_s"], "best_batch": best["batch"],
            "peak_mb_at_largest": fits[max(fits)]["peak_mb"], "trials": fits, "label": best["label"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budgets-gb", type=float, nargs="+", default=[8.0, 12.0])
    ap.add_argument("--models", nargs="+", default=["resnet152", "unet"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--full", action="store_true", help="project-sized models (ResNet-152 at 224x224)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--swap-fraction", type=float, default=0.25, help="saved activations kept on the device")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--out", default="outputs/memory_budget")
    args = ap.parse_args()
    device = torch.device(args.device)
    results: dict[str, Any] = {}
    for gb in args.budgets_gb:
        args.budget_bytes = gb * 2**30
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_bytes / total), device)
        for model in args.models:
            for strategy in args.strategies:
                r = search(model, strategy, args, device)
                results[f"{gb:g} GB|{model}|{strategy}"] = r
                print(f"{gb:g} GB, {model}, {strategy}: largest batch {r['largest_batch']}, best "
                      f"{r['best_samples_per_s']:.1f} samples/s at {r['best_batch']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_budget.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (peak resident growth as memory)"
    md = [f"Training under a memory budget on {where} ({stamp()}); "
          f"`python experiments/memory_budget.py {' '.join(sys.argv[1:])}`", "",
          "| budget | model | strategy | largest batch | best samples/s (batch) | vs best no-offload |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        gb, model, strategy = key.split("|")
        base = results.get(f"{gb}|{model}|none", {}).get("best_samples_per_s") or float("nan")
        md.append(f"| {gb} | {model} | {strategy} | {r['largest_batch']} | {r['best_samples_per_s']:.1f} "
                  f"({r['best_batch']}) | {r['best_samples_per_s'] / base:.2f}x |")
    (out / "memory_budget.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
