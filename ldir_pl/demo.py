"""``make demo``: train the tiny ``demo`` prior if missing, then reconstruct phantoms and real CT at 23 views
with FBP, TV and LDIR, print the tables and write PNG panels under ``outputs/demo/``.

Real CT comes from ``../shared/data/ct-dicom`` when present, else pydicom's bundled ``CT_small.dcm``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from ldir_pl.conf_dir import CONF_DIR
from ldir_pl.reconstruct import run

OUT = Path("outputs/demo")
SHARED_DICOM = CONF_DIR.parent.parent / "shared" / "data" / "ct-dicom"


def real_ct_folder() -> tuple[Path, int]:
    if SHARED_DICOM.is_dir():
        return SHARED_DICOM, 4
    from pydicom.data import get_testdata_file

    folder = OUT / "ct_small"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    return folder, 1


def main() -> None:
    t0 = time.perf_counter()
    prior = OUT / "prior"
    if not (prior / "ldir_prior.json").exists():
        from ldir_pl.train import train_demo_prior

        print(f"training the demo prior into {OUT} (once) ...", flush=True)
        train_demo_prior(OUT)
    ct_root, n_ct = real_ct_folder()
    common = ["physics.num_views=23", "sampler=ldir", f"prior.path={prior.resolve()}", "baselines=[fbp,tv]",
              "data.image_size=64", "trainer.enable_progress_bar=false", "sampler.progress=false"]
    jobs = {
        "phantoms": ["data=phantom", "data.num_test=4", "data.predict_split=test"],
        "real_ct": ["data=dicom", f"data.root={ct_root.resolve()}", f"data.max_images={n_ct}"],
    }
    for name, overrides in jobs.items():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("reconstruct", overrides=[*common, *overrides, f"output_dir={OUT / name}"])
        print(f"\n== {name} ({OUT / name}) ==", flush=True)
        run(cfg)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; panels in {OUT}/*/panels/", flush=True)


if __name__ == "__main__":
    sys.exit(main())
