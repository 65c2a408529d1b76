"""One home per default: the YAML. Where a Python constructor still has a default for a key its YAML sets (None
means "not given", not a default), the two must agree, for every root config of the data, physics and model
groups (the sampler group's are checked in test_ldir_sampler)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ldir_pl.data import SliceDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def target_defaults(node) -> list[tuple[str, str, object, object]]:
    """(target, key, YAML value, Python default) for every key a ``_target_`` node sets that has a default."""
    out = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            mod, _, name = node._target_.rpartition(".")
            cls = getattr(importlib.import_module(mod), name)
            params = dict(inspect.signature(cls).parameters)
            # a data source's split seed reaches the base class through **kwargs: it must never differ
            params.update({k: v for k, v in inspect.signature(SliceDataModule).parameters.items()
                           if k == "seed" and issubclass(cls, SliceDataModule)})
            for key, p in params.items():
                if (key in node and p.default is not inspect.Parameter.empty and not OmegaConf.is_interpolation(node, key)
                        and not isinstance(node[key], DictConfig)):
                    out.append((node._target_, key, node[key], p.default))
        for value in node.values():
            out += target_defaults(value)
    return out


def roots(group: str) -> list[str]:
    """Config files of a group that do not build on another file of it (where defaults live)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml")
                  if not any(f"- {q.stem}" in p.read_text() for q in (CONF / group).glob("*.yaml") if q != p))


CASES = [("reconstruct", "data", n, ["++data.path=/some/file.npz" if n == "packed" else "++data.root=/some/dir"])
         for n in roots("data")] + \
        [("reconstruct", "physics", n, []) for n in roots("physics")] + \
        [("train", "model", None, [])]


@pytest.mark.parametrize("app,group,name,extra", CASES, ids=[f"{g}-{n}" for _, g, n, _ in CASES])
def test_python_defaults_equal_the_yaml(app, group, name, extra):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(app, ([f"{group}={name}"] if name else []) + extra)
    node = cfg[group]
    mismatched = [(t, k, v, d) for t, k, v, d in target_defaults(node) if d is not None and v != d]
    assert not mismatched, mismatched
