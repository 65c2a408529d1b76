"""``make gpu-check`` runs its pipeline on the CPU at tiny sizes, so on a GPU only GPU problems remain."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import gpu_check  # noqa: E402


def test_quick_cpu_run_prints_one_json_with_every_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--skip-tests", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["failed_steps"] == []
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"]
    assert "| swap | ok |" in (tmp_path / "gpu_check.md").read_text()
    assert report["physics"]["result"]["cases"]["64x10"]["speedup"] > 0
    sampler = report["sampler"]["result"]
    assert sampler["ldir_s_per_image"] > 0 and sampler["pixel_dps_peak_mem_mb"] > 0
    swap = report["swap"]["result"]
    assert {"none", "save_on_cpu", "swap@0.25"} <= set(swap["models"]["latent_unet"])
    assert str(swap["batch_size_search"]["brute_best_batch"]) in swap["batch_size_search"]["brute_force_table"]


def test_pytest_summary_and_missing_gpu():
    assert gpu_check.pytest_counts("...\n12 passed, 3 skipped, 1 failed in 40.1s") == {
        "passed": 12, "skipped": 3, "failed": 1}
    assert gpu_check.last_json('noise\n{"a": 1}\n') == {"a": 1}
    if not torch.cuda.is_available():  # a clear message and exit status 2, not a crash mid-benchmark
        assert gpu_check.main(["--device", "cuda"]) == 2


def test_steps_keep_the_users_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/offline-wheels")
    parts = gpu_check.child_env()["PYTHONPATH"].split(":")
    assert parts[-1] == "/opt/offline-wheels" and str(ROOT) in parts
