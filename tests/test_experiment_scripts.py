"""Every script in ``experiments/`` runs end to end on a tiny case (32x32 images, a tiny prior, a few slices), so
no script can rot while the library changes under it. The figures they print are not checked here; the tables
in the docs come from full runs."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from tiny import tiny_latent_bundle

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMALL = ["data.image_size=32", "physics.image_size=32", "tv.max_iterations=20"]

pytestmark = pytest.mark.skipif(not (SHARED / "ct-dicom").is_dir() or not (SHARED / "ct-volumes").is_dir(),
                                reason="needs ../shared/data (ct-dicom and ct-volumes)")


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    from ldir_pl.models.bundle import save_prior

    b = tiny_latent_bundle(size=32)
    meta = {**b.metadata, "image_size": 32, "scaling_factor": b.scaling_factor,
            "training_history": [{"stage": "ldm", "minutes": 1.0, "epochs": 1, "images_seen": 8, "where": "CPU"}]}
    return save_prior(tmp_path_factory.mktemp("run") / "prior", b.vae, b.unet, b.scheduler, meta)


def script(name: str, *args: str) -> None:
    """Run ``experiments/<name>.py`` in this process (no interpreter start-up) with ``args``."""
    old, old_path = sys.argv, list(sys.path)
    sys.argv = [name, *map(str, args)]
    sys.path.insert(0, str(ROOT / "experiments"))  # as `python experiments/<name>.py` puts it first
    try:
        runpy.run_path(str(ROOT / "experiments" / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old, old_path


def cases(prior: Path, out: Path) -> dict[str, list[str]]:
    p = f"--prior={prior}"
    return {
        "ablation": [p, "--views", "10", "--max-images", "2", "--skip-paper", "--out", out, "--", *SMALL],
        "tune_sampler": [p, "--views", "10", "--max-images", "2", "--candidate", "fast=num_steps=2 guidance.final_steps=1",
                         "--out", out, "--", *SMALL],
        "tune_tv": ["--views", "10", "--max-images", "2", "--out", out, "--", "data.image_size=32", "physics.image_size=32"],
        "sparse_view_table": [p, "--views", "10", "--max-images", "1", "--out", out, "--", *SMALL],
        "operator_table": [p, "--physics", "superres", "--max-images", "1", "--out", out, "--", *SMALL],
        "volume_table": [p, "--split", "test", "--slab", "4", "--views", "10", "--methods", "fbp", "tv3d", "ldir3d",
                         "--out", out, "--", *SMALL, "data.max_images=1"],
        "profile_ldir": [p, "--views", "10", "--images", "2", "--out", out, "--", *SMALL],
        "prior_quality": ["--prior", prior, "--samples", "2", "--steps", "2", "--volume-slices", "4", "--curve",
                          prior.parent, "--figure", out / "curve.png", "--out", out, "--", "data.image_size=32"],
        "package_prior": ["--run", prior.parent, "--dest", out / "packaged", "--out", out / "tables", "--max-images", "1"],
        "update_docs": ["--check"],
        "memory_budget": ["--device", "cpu", "--budgets-gb", "1", "--models", "unet", "--strategies", "none",
                          "swap+search", "--start", "1", "--max-batch", "2", "--steps", "1", "--warmup", "0",
                          "--out", out],
    }


NAMES = ["ablation", "tune_sampler", "tune_tv", "sparse_view_table", "operator_table", "volume_table", "profile_ldir",
         "prior_quality", "package_prior", "update_docs", "memory_budget"]
COVERED_ELSEWHERE = {"gpu_check": "test_gpu_check.py (its --quick CPU run)",
                     "bench_swap": "test_gpu_check.py (gpu_check runs it)",
                     "bench_sampler": "test_gpu_check.py (gpu_check runs it)",
                     "bench_physics": "test_gpu_check.py (gpu_check runs it)",
                     "bench_cpu_processes": "its --help only here: it times several processes (minutes)",
                     "pack_gpu_run": "test_gpu_pack.py"}


def test_every_script_is_smoke_tested():
    scripts = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    assert scripts == set(NAMES) | set(COVERED_ELSEWHERE), scripts ^ (set(NAMES) | set(COVERED_ELSEWHERE))


@pytest.mark.parametrize("name", NAMES)
def test_script_runs_on_a_tiny_case(name, prior, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    script(name, *cases(prior, out)[name])
    if name in ("ablation", "tune_sampler", "sparse_view_table", "volume_table", "prior_quality", "memory_budget"):
        written = [p for p in out.rglob("*") if p.suffix in (".md", ".json")]
        assert written, f"{name} wrote no table"
    if name == "prior_quality":
        rows = json.loads((out / "prior_quality.json").read_text())["rows"]
        assert rows[0]["n test"] > 0 and 0 <= rows[0]["body_share"] <= 1 and (out / "curve.png").is_file()


def test_process_benchmark_parses_its_arguments(capsys):
    with pytest.raises(SystemExit) as stop:
        script("bench_cpu_processes", "--help")
    assert stop.value.code == 0 and "--images" in capsys.readouterr().out
