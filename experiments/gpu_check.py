"""One GPU check: the ``cuda`` tests, then the GPU benchmarks, then one JSON object as the last line.

    make gpu-check                                   # on a GPU machine, ~5-7 min on one H200
    python experiments/gpu_check.py --device cpu --quick --skip-tests   # the same pipeline, tiny, on CPU

Steps (each in its own process, each with a time limit so the whole check fits a lent machine's time):
``tests`` (pytest -m cuda), ``physics`` (sparse operator vs ODL astra_cuda), ``sampler`` (LDIR vs pixel
DPS s/image and peak memory at 256x256), ``swap`` (swap-out vs none vs ``save_on_cpu`` vs checkpointing
on the latent UNet and ResNet-152: peak memory and images/s; batch-size search pick vs brute force).
Nothing is installed: it runs with the interpreter that starts it. Exit status 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(device: str, quick: bool) -> dict[str, tuple[list[str], int]]:
    """name -> (argv after the interpreter, time limit in seconds)."""
    exp = str(ROOT / "experiments")
    if quick:
        return {
            "physics": ([f"{exp}/bench_physics.py", "--device", device, "--cases", "64x10", "--batch", "2",
                         "--reps", "1"], 120),
            "sampler": ([f"{exp}/bench_sampler.py", "--device", device, "--steps", "2", "--views", "8",
                         "--ldir-steps", "--", "tv.max_iterations=20"], 180),
            "swap": ([f"{exp}/bench_swap.py", "--device", device, "--models", "unet", "--batch", "2", "--size", "16",
                      "--steps", "1", "--warmup", "1", "--search-max", "8", "--trial-steps", "2"], 180),
        }
    return {
        "tests": (["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")], 150),
        "physics": ([f"{exp}/bench_physics.py", "--device", device, "--cases", "256x23,256x60,512x60",
                     "--batch", "8", "--reps", "5"], 60),
        "sampler": ([f"{exp}/bench_sampler.py", "--device", device, "--views", "23", "--batch", "8",
                     "--ldir-steps", "20"], 300),  # one LDIR setting and pixel DPS: each a fresh process
        "swap": ([f"{exp}/bench_swap.py", "--device", device, "--full", "--models", "unet,resnet152",
                  "--batch", "32", "--steps", "5", "--warmup", "2", "--search-max", "256", "--trial-steps", "4"], 180),
    }


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def pytest_counts(text: str) -> dict:
    """'3 passed, 1 skipped in 12s' -> {'passed': 3, 'skipped': 1}."""
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    counts = {}
    for part in tail.replace("=", "").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    return counts


def child_env() -> dict[str, str]:
    """The environment of every step: the project and its tests put in front of the user's own PYTHONPATH (which
    may hold the packages of a machine without network access), never in its place."""
    ours = [str(ROOT / "tests"), str(ROOT)]
    theirs = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(ours + theirs)}


def run_step(name: str, argv: list[str], limit: int) -> dict:
    t0 = time.perf_counter()
    print(f"[gpu-check] {name}: {' '.join(argv[-12:])} (limit {limit} s)", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env=child_env())
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1), "log_tail": out[-1500:]}
    seconds = round(time.perf_counter() - t0, 1)
    sys.stderr.write(proc.stdout[-4000:])
    result: dict = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}", "seconds": seconds}
    if name == "tests":
        result["counts"] = pytest_counts(proc.stdout)
    else:
        result["result"] = last_json(proc.stdout)
        if result["result"] is None and result["status"] == "ok":
            result["status"] = "no JSON result"
    if result["status"] != "ok":
        result["log_tail"] = (proc.stdout + proc.stderr)[-1500:]
    return result


def write_summary(report: dict, out: Path) -> None:
    """``OUT/gpu_check.json`` (everything) and ``OUT/gpu_check.md`` (one line per step), which
    ``update_docs.py`` copies into docs/results/."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`make gpu-check` on {report.get('gpu') or report['device']} (torch {report['torch']}, "
             f"{time.strftime('%Y-%m-%d')}): {'ok' if report['ok'] else 'failed: ' + ', '.join(report['failed_steps'])}",
             "", "| step | status | seconds | result |", "|---|---|---|---|"]
    for name, step in report.items():
        if isinstance(step, dict) and "status" in step:
            result = step.get("counts") or {k: v for k, v in (step.get("result") or {}).items()
                                            if isinstance(v, (int, float, str))}
            lines.append(f"| {name} | {step['status']} | {step['seconds']} | {json.dumps(result)[:300]} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run of the same pipeline)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps")
    ap.add_argument("--out", default="outputs/gpu_check", help="gpu_check.json and the markdown summary go here")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); "
              "use --device cpu --quick for the CPU smoke run", file=sys.stderr)
        return 2
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "quick": args.quick}
    t0 = time.perf_counter()
    for name, (cmd, limit) in steps(args.device, args.quick).items():
        if (args.skip_tests and name == "tests") or (args.only is not None and name not in args.only):
            continue
        report[name] = run_step(name, cmd, limit)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("status") != "ok"]
    if "tests" in report and report["tests"].get("counts", {}).get("failed"):
        failed.append("tests")
    report["ok"] = not failed
    report["failed_steps"] = sorted(set(failed))
    write_summary(report, Path(args.out))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
