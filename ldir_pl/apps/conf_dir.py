"""Where the Hydra configs live (the repository's top-level ``conf/``; ``LDIR_CONF_DIR`` overrides), and the
config resolvers they use.

``conf/`` sits outside the package (the user asked for that layout), so console scripts resolve it
explicitly; ``--config-dir`` still adds a user's own config folder on top.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from ldir_pl.errors import ConfigError

CONF_DIR = Path(os.environ.get("LDIR_CONF_DIR", Path(__file__).resolve().parents[2] / "conf")).resolve()

if not (CONF_DIR / "reconstruct.yaml").exists():  # e.g. a non-editable install without the repository
    raise ConfigError(f"ldir-pl configs not found in {CONF_DIR}: run from a checkout (pip install -e .) or set "
                      "LDIR_CONF_DIR to the repository's conf/ folder")


def tv_weight(table: Mapping, physics: Mapping) -> float:
    """The tuned TV weight for a physics config: ``table[kind]`` is a number, or for CT a map from view counts
    to weights, interpolated linearly in log(views) and log(weight) between tuned counts (clamped outside)."""
    target = physics.get("_target_") if isinstance(physics, Mapping) else None
    kind = getattr(get_class(target), "kind", None) if target else None
    if kind not in table:
        raise ConfigError(f"tv.weights has no entry for physics {target} (kind {kind!r}): add one, or set "
                          "tv.weight=<value>")
    entry = table[kind]
    if not isinstance(entry, Mapping):
        return float(entry)
    views = int(physics["num_views"])
    known = sorted((int(v), float(w)) for v, w in entry.items())
    if views <= known[0][0]:
        return known[0][1]
    if views >= known[-1][0]:
        return known[-1][1]
    for (v0, w0), (v1, w1) in zip(known, known[1:]):
        if v0 <= views <= v1:
            f = (math.log(views) - math.log(v0)) / (math.log(v1) - math.log(v0))
            return float(math.exp((1 - f) * math.log(w0) + f * math.log(w1)))
    raise AssertionError("unreachable")


def packaged_prior_path(name: str) -> str:
    """``${packaged_prior:ct256}``: the folder of a prior that ships with the package (checked where it loads)."""
    from ldir_pl.priors import ROOT

    return str(ROOT / name)


def by_device(cpu: int, cuda: int) -> int:
    """``${by_device:2,8}``: the first value on a CPU-only machine, the second where CUDA is available (e.g. the
    batch that is fastest per image on each)."""
    import torch

    return cuda if torch.cuda.is_available() else cpu


for _name, _fn in (("tv_weight", tv_weight), ("packaged_prior", packaged_prior_path), ("by_device", by_device)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
