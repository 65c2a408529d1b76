"""Build a reconstruction method from its ``conf/sampler/<name>.yaml``: the YAML is where defaults live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldir_pl.apps.conf_dir import CONF_DIR
from ldir_pl.errors import MissingPathError


def compose_sampler(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``reconstruct`` config with ``sampler=<name>`` (its own ``defaults`` applied) and ``overrides``."""
    if not (CONF_DIR / "sampler" / f"{name}.yaml").exists():
        raise MissingPathError(f"no sampler config {CONF_DIR / 'sampler' / (name + '.yaml')}")
    args = [f"sampler={name}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="reconstruct", overrides=args)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="reconstruct", overrides=args)


#: overrides that address the reconstruct config's root rather than ``sampler``
ROOT_KEYS = ("sampler/", "seed=", "prior.", "prior=", "tv.", "tv_weights.", "physics.", "physics=", "physics/", "data.",
             "data=", "paths.", "recon.")


def load_sampler(name: str, prior: Any = None, overrides: Sequence[str] = ()) -> Any:
    """``conf/sampler/<name>.yaml`` with ``overrides`` (``"num_steps=4"``, ``"guidance.step_size.lr=0.1"``,
    ``"refine=null"``, group choices like ``"sampler/guidance/update=momentum"``, keys of the reconstruct
    config's root such as ``"tv.max_iterations=50"``), built with ``prior`` (a folder or a loaded
    ``PriorBundle``) when given::

        ldir = load_sampler("ldir", prior=bundle, overrides=["num_steps=50"])
        x = ldir.reconstruct(y, physics, ids)
    """
    cfg = compose_sampler(name, [o if o.startswith(ROOT_KEYS) else f"sampler.{o}" for o in overrides])
    return _build(cfg.sampler, prior)


def _build(node: DictConfig, prior: Any) -> Any:
    """Instantiate ``node`` with a loaded ``prior`` where it takes one (its own, or a nested slice sampler's):
    a loaded bundle is passed as an object, it never becomes a config."""
    if prior is None:
        return instantiate(node)
    if "prior" in node:
        return instantiate(node, _partial_=True)(prior=prior)
    if "slices" in node:
        return instantiate(node, slices=_build(node.slices, prior))
    return instantiate(node)
