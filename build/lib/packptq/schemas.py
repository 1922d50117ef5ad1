"""The typed schemas of the config sections packptq owns, registered with Hydra's ConfigStore
as ``<group>/base``: each default is written once, in its dataclass, and a choice file under
``conf/<group>/`` lists ``base`` in its defaults and holds only what differs from it."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from packptq.mp import MPConfig
from packptq.packing import PackingConfig
from packptq.quant import QuantConfig
from packptq.recon import ReconConfig
from packptq.zoo.build import ModelConfig

SCHEMAS = {"quant": QuantConfig, "packing": PackingConfig, "mp": MPConfig, "recon": ReconConfig,
           "model": ModelConfig}


def register() -> None:
    """Store every schema (idempotent: the store overwrites an entry of the same name)."""
    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="base", node=schema)


register()
