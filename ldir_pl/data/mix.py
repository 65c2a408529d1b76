"""Several slice sources trained on together, evaluated on one of them.

Training draws from every source's training split; validation, test and prediction come from
``eval_source`` alone, so figures stay comparable with a run on that source by itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from ldir_pl.data.base import Item, SliceDataModule
from ldir_pl.errors import ConfigError


class MixDataModule(SliceDataModule):
    """``sources``: name -> data module (built by Hydra). Image ids are ``<source>:<id>`` in the training set and
    the eval source's own ids elsewhere (so predictions of ``data=ct_mix`` and ``data=dicom`` share ids)."""

    def __init__(self, sources: Mapping[str, SliceDataModule], eval_source: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if not sources:
            raise ConfigError("data.sources is empty: name at least one data source")
        if eval_source not in sources:
            raise ConfigError(f"data.eval_source={eval_source!r} is not one of data.sources {sorted(sources)}")
        for name, src in sources.items():
            if not isinstance(src, SliceDataModule):
                raise ConfigError(f"data.sources.{name} is a {type(src).__name__}, not a slice data module")
            if src.image_size != self.image_size:
                raise ConfigError(f"data.sources.{name}.image_size={src.image_size} differs from "
                                 f"data.image_size={self.image_size}")
        self.sources, self.eval_source = dict(sources), eval_source

    def setup(self, stage: str | None = None) -> None:
        for src in self.sources.values():
            src.setup(stage)

    def groups(self, split: str) -> set[str]:
        """``<source>:<patient or volume>`` of every source's split (the held-out volumes of a source that only
        trains here included), so a bundle records everything that was kept from training."""
        return {f"{name}:{g}" for name, src in self.sources.items() for g in src.groups(split)}

    def group_of(self, image_id: str) -> str:
        """``<source>:<group>`` for a training id (``<source>:<id>``), the eval source's group otherwise."""
        name, sep, rest = image_id.partition(":")
        if sep and name in self.sources:
            return f"{name}:{self.sources[name].group_of(rest)}"
        return f"{self.eval_source}:{self.sources[self.eval_source].group_of(image_id)}"

    def _items(self, split: str) -> list[Item]:
        if split != "train":
            return self.sources[self.eval_source].items(split)
        return [(f"{name}:{i}", load) for name, src in self.sources.items() for i, load in src.items("train")]
