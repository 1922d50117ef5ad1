"""The typed mp section (packptq.mp.config): the choice files, the primary config's defaults,
every malformed section, and the avg_bits range left to check_feasible."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from packptq.config import ConfigError, typed
from packptq.mp import ALLOCATORS, MPConfig, check_feasible

CONF_MP = Path(__file__).resolve().parents[1] / "conf" / "mp"


@pytest.mark.parametrize("path", sorted(CONF_MP.glob("*.yaml")), ids=lambda p: p.stem)
def test_mp_yaml_composes(path):
    section = OmegaConf.load(path)
    assert list(section.pop("defaults")) == ["base", "_self_"]  # the typed schema MPConfig is the base
    fields = {f.name: f.default for f in dataclasses.fields(MPConfig)}
    assert set(section.keys()) <= set(fields)
    # a choice file sets only what differs from the defaults (its policy aside)
    assert all(section[k] != fields[k] for k in section if k != "policy"), dict(section)
    cfg = typed(MPConfig, section, "mp")
    assert cfg.policy == path.stem
    # composed with the primary config, every field is there (so every one can be overridden)
    composed = compose_cfg([f"mp={path.stem}", "run_dir=/tmp/x"]).mp
    assert set(composed.keys()) == set(fields)
    assert typed(MPConfig, composed, "mp") == cfg


def test_the_default_mp_section_is_the_schema_defaults():
    composed = compose_cfg(["run_dir=/tmp/x"]).mp
    assert OmegaConf.to_container(composed) == dataclasses.asdict(MPConfig())


def test_every_policy_has_a_yaml():
    assert sorted(p.stem for p in CONF_MP.glob("*.yaml")) == ALLOCATORS.names()


@pytest.mark.parametrize(
    "override, match",
    [
        ({"policy": "greedy"}, "known: budget, none, official"),
        ({"policy": "budget", "avg_bits": float("nan")}, "avg_bits"),
        ({"policy": "budget", "avg_bits": float("inf")}, "avg_bits"),
        ({"policy": "none", "avg_bits": 3.0}, "only used by mp.policy=budget"),
        ({"policy": "budget", "candidates": [1, 2]}, "2..8"),
        ({"policy": "budget", "candidates": [3, 3]}, "duplicates"),
        ({"policy": "budget", "candidates": []}, "non-empty"),
        ({"policy": "none", "candidates": [3, 4]}, "unused"),
        ({"policy": "official", "sensitivity": "omega", "candidates": [2, 3, 4]}, "exactly two"),
        ({"policy": "official", "sensitivity": "kl"}, "sensitivity=omega"),
        ({"policy": "official", "sensitivity": "omega", "avg_bits": 3.5}, "avg_bits"),
        ({"sensitivity": "mse"}, "sensitivity"),
        ({"acts": "half"}, "acts"),
        ({"prefix_bits": 9}, "prefix_bits"),
        ({"avg_bit": 3.0}, "avg_bit"),  # typo: strict schema
        ({"candidates": "3"}, "mp"),    # wrong type
    ],
)
def test_bad_mp_config_raises(override, match):
    with pytest.raises(ConfigError, match=match):
        typed(MPConfig, override, "mp")


@pytest.mark.parametrize("avg", [1.5, 9.0])
def test_an_out_of_range_avg_bits_is_typed_and_stopped_by_check_feasible(avg):
    cfg = typed(MPConfig, {"policy": "budget", "avg_bits": avg}, "mp")
    assert cfg.avg_bits == avg
    with pytest.raises(ConfigError, match=r"feasible range of mp.avg_bits is \[2.0000, 4.0000\]"):
        check_feasible(cfg, 3, [10, 10])
