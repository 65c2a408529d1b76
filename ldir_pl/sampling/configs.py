"""Build a reconstruction method from its ``conf/sampler/<name>.yaml``: the YAML is where defaults live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldir_pl.conf_dir import CONF_DIR


def compose_sampler(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``reconstruct`` config with ``sampler=<name>`` (its own ``defaults`` applied) and ``overrides``."""
    if not (CONF_DIR / "sampler" / f"{name}.yaml").exists():
        raise FileNotFoundError(f"no sampler config {CONF_DIR / 'sampler' / (name + '.yaml')}")
    args = [f"sampler={name}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="reconstruct", overrides=args)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="reconstruct", overrides=args)


def load_sampler(name: str, prior: Any = None, overrides: Sequence[str] = ()) -> Any:
    """``conf/sampler/<name>.yaml`` with ``overrides`` (``"num_steps=4"``, ``"step_size.lr=0.1"``,
    ``"refine=null"``, group choices like ``"sampler/update=momentum"``), built with ``prior`` (a folder or a
    loaded ``PriorBundle``) when given::

        ldir = load_sampler("ldir", prior=bundle, overrides=["num_steps=50"])
        x = ldir.reconstruct(y, physics, ids)
    """
    cfg = compose_sampler(name, [o if o.startswith(("sampler/", "seed=", "prior.")) else f"sampler.{o}"
                                 for o in overrides])
    if prior is None or "prior" not in cfg.sampler:
        return instantiate(cfg.sampler)
    return instantiate(cfg.sampler, _partial_=True)(prior=prior)  # a loaded bundle must not become a config
