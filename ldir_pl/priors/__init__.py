"""Priors that ship with the package: ``packaged_prior("ct256")`` is the folder ``PriorBundle.from_pretrained``
(or diffusers' ``LDMPipeline.from_pretrained``) loads; each folder's README says how it was trained."""

from __future__ import annotations

from pathlib import Path

from ldir_pl.errors import MissingPathError

ROOT = Path(__file__).resolve().parent


def packaged_prior(name: str) -> Path:
    """The folder of the packaged prior ``name`` (e.g. ``ct256``)."""
    path = ROOT / name
    if not (path / "ldir_prior.json").is_file():
        known = sorted(p.name for p in ROOT.iterdir() if (p / "ldir_prior.json").is_file())
        raise MissingPathError(f"no packaged prior {name!r} in {ROOT} (packaged: {known or 'none'}); "
                               "pass prior.path=<folder written by ldir-train>")
    return path


__all__ = ["packaged_prior"]
