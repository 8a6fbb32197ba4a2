"""runx's config tree (found by Hydra as pkg://runx.conf).

Importing this package registers, once per process:
- `base`: every key with its default, generated from the dataclass schemas in runx.conf.schema
  (so YAML files only state what differs and a key typo is an error, not a silent new key);
- the `runx_first` resolver: first non-null argument (used for the run dir).
"""
from __future__ import annotations

from dataclasses import asdict


def _register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from runx.conf.schema.core import RunConfig

    if not OmegaConf.has_resolver("runx_first"):
        OmegaConf.register_new_resolver(
            "runx_first", lambda *args: next((a for a in args if a not in (None, "", "null")), None))
    ConfigStore.instance().store(name="base", node=OmegaConf.create(asdict(RunConfig())))


_register()
