"""Typed, strict views of the config sections that packptq itself owns.

Hydra composes plain YAML; each section is merged into its dataclass schema here, so an
unknown key or a wrong type is an error before any compute, and range checks live in
``__post_init__``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Type, TypeVar

T = TypeVar("T")

#: the Hydra config tree, shipped inside the package (packptq/conf): the command line and the
#: Python API compose from here, in a source checkout and in an installed wheel alike
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what to fix (exit status 2)."""


class RunFailure(RuntimeError):
    """A run that started from good input and failed (a reconstruction that diverged, a full
    disk); the message says what happened and what is kept (exit status 1)."""


def typed(schema: Type[T], section: Any, where: str) -> T:
    """Merge ``section`` (a DictConfig or dict) into the dataclass ``schema`` strictly and
    return a dataclass instance. Unknown keys and bad types raise ConfigError naming ``where``."""
    from omegaconf import DictConfig, OmegaConf  # here: the command lines import this module for its errors

    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        if section is not None:
            if isinstance(section, DictConfig):
                missing = sorted(OmegaConf.missing_keys(section))
                if missing:
                    raise ConfigError(f"'{where}' config needs a value for {missing} (e.g. {where}.{missing[0]}=...)")
                section = OmegaConf.to_container(section, resolve=True)
            # free-form dict fields (e.g. model.kwargs) accept any keys; the rest stays strict
            for key in list(base.keys()) if isinstance(section, dict) else []:
                if key in section and not OmegaConf.is_missing(base, key) and isinstance(base[key], DictConfig):
                    OmegaConf.set_struct(base[key], False)
            merged = OmegaConf.merge(base, section)
        else:
            merged = base
        return OmegaConf.to_object(merged)  # runs __post_init__
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf's errors are verbose; keep the gist
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad '{where}' config: {msg}") from None
