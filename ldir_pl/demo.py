"""``make demo``: train a tiny prior if missing, then reconstruct real CT (and phantoms) at 23 views with FBP,
TV and LDIR, print the tables and write PNG panels under ``outputs/demo/``.

With ``../shared/data`` present the prior is trained on the 64x64 slices of ``ct-volumes`` (``experiment=demo_ct``)
and reconstructs test patients of ``ct-dicom`` it never saw; without it, on phantoms (``experiment=demo``), and
the real-CT part uses pydicom's bundled ``CT_small.dcm``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir

from ldir_pl.conf_dir import CONF_DIR
from ldir_pl.reconstruct import run

OUT = Path("outputs/demo")
SHARED = CONF_DIR.parent.parent / "shared" / "data"
REAL_PRIOR = "ldir-train experiment=ct_cpu paths.data_dir=../shared/data output_dir=outputs/ct_cpu"


def ct_small_folder() -> Path:
    from pydicom.data import get_testdata_file

    folder = OUT / "ct_small"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    return folder


def quiet(log_file: Path) -> None:
    """Lightning's tips, model summaries and warnings go to ``log_file``; the terminal keeps steps and tables."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    for name in ("pytorch_lightning", "lightning_fabric", "lightning", "ldir_pl", "py.warnings"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def main() -> None:
    t0 = time.perf_counter()
    quiet(OUT / "demo.log")
    shared = (SHARED / "ct-volumes").is_dir() and (SHARED / "ct-dicom").is_dir()
    experiment = "demo_ct" if shared else "demo"
    prior = OUT / experiment / "prior"
    if not (prior / "ldir_prior.json").exists():
        from ldir_pl.train import train_demo_prior

        print(f"training the {experiment} prior into {OUT / experiment} (once; details in {OUT / 'demo.log'}) ...",
              flush=True)
        t_train = time.perf_counter()
        train_demo_prior(OUT / experiment, experiment=experiment,
                         overrides=[f"paths.data_dir={SHARED}", "++trainer.enable_model_summary=false",
                                    "callbacks.progress_bar.refresh_rate=0"])
        print(f"prior trained in {time.perf_counter() - t_train:.0f} s", flush=True)
    common = ["physics.num_views=23", "sampler=ldir", f"prior.path={prior.resolve()}", "baselines=[fbp,tv]",
              "data.image_size=64", "trainer.enable_progress_bar=false", "sampler.progress=false"]
    if shared:
        jobs = {"real_ct": ["data=dicom", f"data.root={(SHARED / 'ct-dicom').resolve()}", "data.predict_split=test",
                            "data.max_images=4"]}
    else:
        jobs = {"phantoms": ["data=phantom", "data.num_test=4", "data.predict_split=test"],
                "real_ct": ["data=dicom", f"data.root={ct_small_folder().resolve()}", "data.test_fraction=0",
                            "data.val_fraction=0"]}
    for name, overrides in jobs.items():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("reconstruct", overrides=[*common, *overrides, f"output_dir={OUT / name}"])
        print(f"\n== {name} ({OUT / name}) ==", flush=True)
        run(cfg)
    print(f"\nThe demo prior is a few-minute toy at 64x64 ({experiment}); the real one (256x256, ~1 h on 2 cores): "
          f"{REAL_PRIOR}")
    print(f"demo done in {time.perf_counter() - t0:.0f} s; panels in {OUT}/*/panels/", flush=True)


if __name__ == "__main__":
    sys.exit(main())
