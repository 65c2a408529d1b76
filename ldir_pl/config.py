"""The Hydra configs as the library and scripts use them: where ``conf/`` is, the resolvers its YAML files call,
and building a reconstruction method from its ``conf/sampler/<name>.yaml`` (the YAML is where defaults live).

``conf/`` sits at the repository's top level (the user asked for that layout), so it is found explicitly:
``LDIR_CONF_DIR``, else the checkout this package was installed from (``pip install -e .``). The resolvers
(``${tv_weight:...}``, ``${packaged_prior:...}``, ``${by_device:...}``) are registered by
``register_resolvers()``, which every entry point and every compose helper here calls; nothing happens at import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldir_pl.errors import ConfigError, MissingPathError

CONF_DIR = Path(os.environ.get("LDIR_CONF_DIR", Path(__file__).resolve().parents[1] / "conf")).resolve()


def require_conf_dir() -> Path:
    """``CONF_DIR``, or an error saying how to point at it."""
    if not (CONF_DIR / "reconstruct.yaml").exists():  # e.g. a non-editable install without the repository
        raise ConfigError(f"ldir-pl configs not found in {CONF_DIR}: run from a checkout (pip install -e .) or set "
                          "LDIR_CONF_DIR to the repository's conf/ folder")
    return CONF_DIR


# ---------------------------------------------------------------------------------------------- resolvers
def tv_weight(table: Mapping, physics: Mapping) -> float:
    """The tuned TV weight for a physics config: ``table[family]`` is a number, or for CT a map from view counts
    to weights, interpolated linearly in log(views) and log(weight) between tuned counts (clamped outside)."""
    from hydra.utils import get_class

    target = physics.get("_target_") if isinstance(physics, Mapping) else None
    family = getattr(get_class(target), "family", None) if target else None
    if family not in table:
        raise ConfigError(f"tv.weights has no entry for physics {target} (family {family!r}): add one, or set "
                          "tv.weight=<value>")
    return interpolate_by_views(table[family], physics)


def interpolate_by_views(entry: Any, physics: Mapping) -> float:
    """A number as it is; a map from view counts to values, interpolated in log(views) and log(value)."""
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


def by_device(cpu: Any, cuda: Any) -> Any:
    """``${by_device:2,auto}``: the first value on a CPU-only machine, the second where CUDA is available (e.g. the
    sampler's chunk: the fastest per image on a CPU, sized by free memory on a GPU)."""
    import torch

    return cuda if torch.cuda.is_available() else cpu


RESOLVERS = {"tv_weight": tv_weight, "packaged_prior": packaged_prior_path, "by_device": by_device}


def register_resolvers() -> None:
    """Make the resolvers the YAML files call known to OmegaConf (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# ---------------------------------------------------------------------------------------------- composing
def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, as the command would see it, without a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
    with initialize_config_dir(str(require_conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def compose_sampler(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``reconstruct`` config with ``sampler=<name>`` (its own ``defaults`` applied) and ``overrides``."""
    if not (require_conf_dir() / "sampler" / f"{name}.yaml").exists():
        raise MissingPathError(f"no sampler config {CONF_DIR / 'sampler' / (name + '.yaml')}")
    return compose("reconstruct", [f"sampler={name}", *overrides])


#: overrides that address the reconstruct config's root rather than ``sampler``
ROOT_KEYS = ("sampler/", "seed=", "prior.", "prior=", "tv.", "tv_weights.", "physics.", "physics=", "physics/", "data.",
             "data=", "paths.", "recon.", "progress=")


def load_sampler(name: str, prior: Any = None, overrides: Sequence[str] = ()) -> Any:
    """``conf/sampler/<name>.yaml`` with ``overrides`` (``"num_steps=4"``, ``"guidance.step_size.lr=0.1"``,
    ``"refine=null"``, group choices like ``"sampler/guidance/update=momentum"``, keys of the reconstruct
    config's root such as ``"tv.max_iterations=50"``), built with ``prior`` (a folder or a loaded
    ``PriorBundle``) when given::

        ldir = load_sampler("ldir", prior=bundle, overrides=["num_steps=50"])
        x = ldir.reconstruct(y, physics, ids)
    """
    cfg = compose_sampler(name, [o if o.startswith(ROOT_KEYS) else f"sampler.{o}" for o in overrides])
    return build_sampler(cfg.sampler, prior)


def build_sampler(node: DictConfig, prior: Any = None) -> Any:
    """Instantiate ``node`` with a loaded ``prior`` where it takes one (its own, or a nested slice sampler's):
    a loaded bundle is passed as an object, it never becomes a config."""
    from hydra.utils import instantiate

    if prior is None:
        return instantiate(node)
    if "prior" in node:
        return instantiate(node, _partial_=True)(prior=prior)
    if "slices" in node:
        return instantiate(node, slices=build_sampler(node.slices, prior))
    return instantiate(node)


__all__ = ["CONF_DIR", "build_sampler", "compose", "compose_sampler", "load_sampler", "register_resolvers",
           "require_conf_dir"]
