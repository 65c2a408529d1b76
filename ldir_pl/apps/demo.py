"""``make demo``: reconstruct real 256x256 CT at 23 views with the CT prior that ships with the package (FBP, TV,
LDIR), and with ``../shared/data`` present also a slab of a held-out CT volume (FBP, 3-D TV, 3-D LDIR), printing
the tables and writing panels, NIfTI volumes and metrics under ``outputs/demo/``. Nothing is trained.

With ``../shared/data`` the slices are test patients of ct-dicom and the volume a test volume of ct-volumes, none of
which the prior saw; without it, pydicom's bundled ``CT_small.dcm``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

from ldir_pl.apps.reconstruct import run
from ldir_pl.config import CONF_DIR, compose

OUT = Path("outputs/demo")
SHARED = CONF_DIR.parent.parent / "shared" / "data"


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


def jobs(shared: bool) -> dict[str, list[str]]:
    slices = ["physics.num_views=23", "sampler=ldir", "baselines=[fbp,tv]"]
    if not shared:
        return {"real_ct": [*slices, "data=dicom", f"data.root={ct_small_folder().resolve()}", "data.test_fraction=0",
                            "data.val_fraction=0"]}
    return {
        "real_ct": [*slices, "data=dicom", f"data.root={(SHARED / 'ct-dicom').resolve()}", "data.predict_split=test",
                    "data.max_images=4"],
        "volume": ["physics.num_views=23", "sampler=ldir3d", "baselines=[fbp,tv3d]", "data=ct_volumes",
                   f"paths.data_dir={SHARED.resolve()}", "data.predict_split=test", "data.max_images=1",
                   "data.slices=8", "recon.volume=true"],
    }


def main() -> None:
    t0 = time.perf_counter()
    quiet(OUT / "demo.log")
    shared = (SHARED / "ct-volumes").is_dir() and (SHARED / "ct-dicom").is_dir()
    for name, overrides in jobs(shared).items():
        cfg = compose("reconstruct", [*overrides, f"output_dir={OUT / name}", "progress=false"])
        shutil.rmtree(OUT / name, ignore_errors=True)  # the demo's own folder: a rerun replaces it
        print(f"\n== {name} ({OUT / name}) ==", flush=True)
        run(cfg)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s with the packaged prior ({cfg.prior.path}); "
          f"panels in {OUT}/*/panels/", flush=True)


if __name__ == "__main__":
    sys.exit(main())
