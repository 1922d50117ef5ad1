"""Every config file composes with the primary config, and every section packptq owns passes
its typed schema: each option of each group, each experiment (and each value its sweep would
set), each launcher. Third-party sections are checked against what consumes them (Trainer
keyword arguments, Lightning loggers, Hydra launchers)."""
from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf

from packptq.config import ConfigError, typed
from packptq.data import DATASETS
from packptq.packing import PackingConfig
from packptq.mp import MPConfig
from packptq.quant import QuantConfig
from packptq.recon import ReconConfig
from packptq.zoo.build import ModelConfig

from conftest import CONF, compose_cfg

GROUPS = ["model", "data", "quant", "packing", "mp", "recon", "trainer", "logger", "profile", "method",
          "experiment", "hydra/launcher"]
#: values that an option leaves mandatory (???), supplied so it can compose completely
#: ({tmp} is the test's tmp_path, holding an empty d.npz)
FILL = {("model", "timm"): ["model.name=resnet18"],
        ("packing", "manual"): ["packing.packs=[[layer1.0,layer1.1],[layer2.0]]"],
        ("data", "npz"): ["data.path={tmp}/d.npz"],
        ("data", "imagefolder"): ["data.path={tmp}"]}


def options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_owned(cfg) -> dict:
    """Type every section packptq owns; return the typed objects."""
    return {
        "model": typed(ModelConfig, cfg.model, "model"),
        "data": typed(DATASETS.get(cfg.data.name).Config, cfg.data, "data"),
        "quant": typed(QuantConfig, cfg.quant, "quant"),
        "packing": typed(PackingConfig, cfg.packing, "packing"),
        "mp": typed(MPConfig, cfg.mp, "mp"),
        "recon": typed(ReconConfig, cfg.recon, "recon"),
    }


def base(tmp_path) -> list:
    return [f"run_dir={tmp_path}", f"cache_dir={tmp_path}"]


def test_every_config_folder_is_a_known_group():
    dirs = {str(p.parent.relative_to(CONF)) for p in CONF.rglob("*.yaml")}
    assert dirs <= set(GROUPS) | {"."}, dirs - set(GROUPS)
    assert all(options(g) for g in GROUPS), [g for g in GROUPS if not options(g)]


def test_primary_config_defaults(tmp_path):
    cfg = compose_cfg(base(tmp_path))
    typedcfg = check_owned(cfg)
    assert typedcfg["model"].name == "resnet18" and typedcfg["data"].name == "mnist5k"
    assert typedcfg["packing"].policy == "hessian" and typedcfg["mp"].policy == "none"
    assert (typedcfg["quant"].w_bits, typedcfg["quant"].a_bits) == (2, 4)
    assert typedcfg["data"].calib_seed == cfg.seed  # calibration follows the run seed
    assert "Wandb" in cfg.logger._target_


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "data", "quant", "packing", "mp", "recon")
                                          for o in options(g)])
def test_owned_group_option_composes_and_types(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    monkeypatch.setenv("MODELNET40_DIR", str(tmp_path))
    (tmp_path / "d.npz").touch()
    fill = [f.format(tmp=tmp_path) for f in FILL.get((group, option), [])]
    cfg = compose_cfg(base(tmp_path) + [f"{group}={option}", *fill])
    typedcfg = check_owned(cfg)
    section = typedcfg[group]
    if group in ("data", "packing", "mp"):
        assert (section.name if group == "data" else section.policy) == option
    if group == "quant":
        assert option == f"w{section.w_bits}a{section.a_bits}"
    if group == "model" and option != "timm":
        assert section.name == option
    # the option sets nothing its schema lacks, even below the top level
    keys = set(OmegaConf.to_container(cfg[group]))
    assert keys <= set(type(section).__dataclass_fields__), keys - set(type(section).__dataclass_fields__)


@pytest.mark.parametrize("group,option,match", [("model", "timm", "needs a value for .*model\\.name"),
                                                ("packing", "manual", "packing=manual needs packing.packs")])
def test_mandatory_values_are_asked_for(group, option, match, tmp_path):
    cfg = compose_cfg(base(tmp_path) + [f"{group}={option}"])
    schema = {"model": ModelConfig, "packing": PackingConfig}[group]
    with pytest.raises(ConfigError, match=match):
        typed(schema, cfg[group], group)


#: what each method of conf/method sets: packing policy, QDrop probability, steps per unit,
#: mp policy, first/last-layer bits, score loss, calibration batch
METHODS = {
    "rtn": ("none", 0.5, "unit", "none", 8, "kl", 32),
    "adaround": ("layer", 1.0, "unit", "none", 8, "kl", 32),
    "brecq": ("block", 1.0, "unit", "none", 8, "kl", 32),
    "qdrop": ("block", 0.5, "unit", "none", 8, "kl", 32),
    "packptq": ("hessian", 0.5, "block", "none", 8, "kl", 32),
    "packptq_official": ("hessian", 0.5, "block", "none", None, "official", 16),
    "packptq_mp": ("hessian", 0.5, "block", "budget", 8, "kl", 32),
}


def test_every_method_is_described():
    assert set(options("method")) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_sets_its_recipe(method, tmp_path):
    cfg = compose_cfg(base(tmp_path) + [f"method={method}"])
    t = check_owned(cfg)
    got = (t["packing"].policy, t["recon"].drop_prob, t["recon"].iters_per, t["mp"].policy,
           t["quant"].first_last_bits, t["packing"].loss, t["recon"].batch_size)
    assert got == METHODS[method]
    # a method is a starting point: the command line still overrides what it sets
    cfg = compose_cfg(base(tmp_path) + [f"method={method}", "packing=block", "recon.drop_prob=0.7"])
    assert (cfg.packing.policy, cfg.recon.drop_prob) == ("block", 0.7)


def test_mp_method_holds_weights_and_activations_to_the_uniform_model(tmp_path):
    """Pack-PTQ + MP at equal cost: the budgets are the uniform model's weight and activation
    averages (tests/test_mp_allocators.py checks the allocation against them)."""
    t = check_owned(compose_cfg(base(tmp_path) + ["method=packptq_mp", "quant=w3a3"]))
    assert (t["mp"].avg_bits, t["mp"].a_avg_bits, t["mp"].acts, t["mp"].budget) == (None, None, "follow", "uniform")


@pytest.mark.parametrize("option", options("profile"))
def test_profile_options_compose_and_type(option, tmp_path):
    cfg = compose_cfg(base(tmp_path) + [f"profile={option}"])
    check_owned(cfg)
    # a profile sets switches of the sections packptq owns, nothing else
    text = OmegaConf.to_container(OmegaConf.load(CONF / "profile" / f"{option}.yaml")) or {}
    assert set(text) <= {"quant", "packing", "mp", "recon", "data"}, set(text)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_are_trainer_arguments(option, tmp_path):
    cfg = compose_cfg(base(tmp_path) + [f"trainer={option}"])
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw.pop("_target_", None)
    params = set(inspect.signature(L.Trainer.__init__).parameters)
    assert set(kw) <= params, set(kw) - params
    trainer = L.Trainer(**{**kw, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                           "default_root_dir": str(tmp_path)})
    # stopping belongs to the callers (recon.iters steps per unit, model.train_epochs for FP
    # training): the option sets neither, so a Trainer built from it alone has Lightning's defaults
    assert not {"max_steps", "max_epochs", "max_time"} & set(kw)
    assert (trainer.max_steps, trainer.max_epochs) == (-1, None)
    # and a reconstruction Trainer built with the option runs exactly recon.iters steps
    from packptq.recon.unit import make_trainer

    recon = make_trainer({**kw, "accelerator": "cpu", "default_root_dir": str(tmp_path)}, cfg.recon.iters)
    assert cfg.recon.iters == 500
    assert (recon.max_steps, recon.max_epochs) == (500, -1)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(option, tmp_path):
    from packptq.cli import make_logger

    cfg = compose_cfg(base(tmp_path) + [f"logger={option}"])
    logger = make_logger(cfg, ["seed=1"], None)
    if option == "none":
        assert cfg.logger is None and logger is None
        return
    assert isinstance(logger, Logger)
    if option == "wandb":
        import wandb

        assert cfg.logger.offline is True  # never syncs unless asked
        # make_logger starts the W&B run (in the run directory, id from it); end it here, or
        # the next wandb.init in this process would return this run
        assert wandb.run is not None and wandb.run.id == logger.version
        assert Path(wandb.run.dir).is_relative_to(tmp_path)
        wandb.finish()
    else:
        assert Path(logger.save_dir) == tmp_path  # logs go in the run directory


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_launcher_options_compose(option, tmp_path):
    cfg = compose_cfg(base(tmp_path) + [f"hydra/launcher={option}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert "submitit" in target or "joblib" in target, target
    check_owned(cfg)


def sweep_values(params) -> list:
    """Each ``key=value`` a sweep over ``hydra.sweeper.params`` would set."""
    out = []
    parser = OverridesParser.create()
    for key, spec in (params or {}).items():
        (ov,) = parser.parse_overrides([f"{key}={spec}"])
        if ov.value_type is not None and ov.value_type.name == "INTERVAL_SWEEP":  # a tuning range: its ends
            iv = ov.value()
            values = [str(iv.start), str(iv.end)]
        else:
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        out += [f"{key}={v}" for v in (values[:1] if key == "seed" else values)]  # seeds compose alike
    return out


#: experiments whose sweeps compose many values (5.7 to 7.4 s each on a shared 2-core box)
SLOW_EXPERIMENTS = {"paper_cnn", "paper_vit", "paper_cnn_mp", "paper_vit_mp", "ablation_granularity",
                    "ablation_granularity_deit"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPERIMENTS else n
                                  for n in options("experiment")])
def test_experiment_composes_and_every_sweep_value_types(name, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))  # paper presets use the real datasets
    monkeypatch.setenv("MODELNET40_DIR", str(tmp_path))
    over = base(tmp_path) + [f"experiment={name}"]
    cfg = compose_cfg(over, return_hydra_config=True)
    check_owned(cfg)
    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    for value in sweep_values(params):
        check_owned(compose_cfg(over + [value], return_hydra_config=True))


@pytest.mark.parametrize("group", ["quant", "packing", "mp", "recon", "model"])
def test_choice_files_hold_only_what_differs_from_the_schema(group):
    """Each default is written once, in the schema registered as <group>/base: a choice file
    names that base and sets no key to the value the schema already has, the keys that name the
    choice itself (a packing/mp policy, a quant file's bit-widths, a model's name) aside."""
    from packptq.schemas import SCHEMAS

    defaults = {f: getattr(SCHEMAS[group](), f) for f in SCHEMAS[group].__dataclass_fields__}
    for path in sorted((CONF / group).glob("*.yaml")):
        section = OmegaConf.to_container(OmegaConf.load(path))
        assert section.pop("defaults", None) == ["base", "_self_"], path
        assert set(section) <= set(defaults), (path, set(section) - set(defaults))
        repeated = {k: v for k, v in section.items() if v == defaults[k] and k not in ("policy", "w_bits", "a_bits", "name")}
        assert not repeated, (path, repeated)
