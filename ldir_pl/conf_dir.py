"""Where the Hydra configs live: the repository's top-level ``conf/`` (``LDIR_CONF_DIR`` overrides).

``conf/`` sits outside the package (the user asked for that layout), so console scripts resolve it
explicitly; ``--config-dir`` still adds a user's own config folder on top.
"""

from __future__ import annotations

import os
from pathlib import Path

CONF_DIR = Path(os.environ.get("LDIR_CONF_DIR", Path(__file__).resolve().parents[1] / "conf")).resolve()

if not (CONF_DIR / "reconstruct.yaml").exists():  # e.g. a non-editable install without the repository
    raise RuntimeError(f"ldir-pl configs not found in {CONF_DIR}: run from a checkout (pip install -e .) or set "
                       "LDIR_CONF_DIR to the repository's conf/ folder")
