"""``ldir-reconstruct`` with 2 CPU processes (gloo DDP): the same per-image metrics as one process, each image
once, when the image count (5) is not a multiple of devices x batch size (2 x 2)."""

import csv
import json
import os

from test_reconstruct_app import _run
from tiny import tiny_latent_bundle

from ldir_pl.models.bundle import save_prior


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return {(r["id"], r["method"]): (float(r["psnr"]), float(r["ssim"])) for r in csv.DictReader(f)}


def test_two_process_predict_equals_one_process(tmp_path):
    b = tiny_latent_bundle(size=32)
    prior = save_prior(tmp_path / "prior", b.vae, b.unet, b.scheduler,
                       {**b.metadata, "image_size": 32, "scaling_factor": b.scaling_factor})
    common = ["data=phantom", "data.image_size=32", "data.num_test=5", "data.batch_size=2", "physics.num_views=12",
              "sampler=ldir", "sampler.num_steps=3", "sampler.guidance.final_steps=2", "tv.max_iterations=20",
              "sampler.progress=false", f"prior.path={prior}", "baselines=[fbp]", "trainer.accelerator=cpu",
              "trainer.enable_progress_bar=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*common, f"output_dir={one}"])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # Lightning shares the cores out
    _run([*common, f"output_dir={two}", "trainer.devices=2", "trainer.strategy=ddp"], env=env)
    rows1, rows2 = _rows(one), _rows(two)
    assert len(rows1) == 10 and sorted(rows1) == sorted(rows2)  # 5 images x 2 methods, each exactly once
    for key, (psnr, ssim) in rows1.items():
        assert abs(rows2[key][0] - psnr) < 1e-3 and abs(rows2[key][1] - ssim) < 1e-4, key
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert list(s1) == list(s2) == ["fbp", "ldir"] and s2["ldir"]["n"] == 5
    assert abs(s1["ldir"]["psnr"] - s2["ldir"]["psnr"]) < 1e-3
    info = json.loads((two / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert len(list((two / "parts").glob("rank*.jsonl"))) == 2
