"""Entry points: ``packptq`` (the Hydra app) and ``packptq-report``. Thin wrappers: the work
is ``pipeline.run(cfg)``, which returns the results dict."""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

import packptq.schemas  # noqa: F401  (the typed bases of conf/<group>/ choice files)
from packptq.config import ConfigError

#: the config tree, shipped inside the package (packptq/conf)
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of a run directory: a resumed or requeued job continues the same run."""
    return "packptq-" + hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def sweep_group(argv: Sequence[str]) -> Optional[str]:
    """The W&B group of a multirun command line: the experiment and the keys it sweeps, e.g.
    ``quickstart:data.calib_size,seed``; None for a single run or an unparsable line."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        return None
    experiment, swept = "default", []
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if key == "experiment" and not o.is_sweep_override():
            experiment = str(o.value())
        elif o.is_sweep_override() and not key.startswith("hydra"):
            swept.append(key)
    return f"{experiment}:{','.join(sorted(swept)) or 'sweep'}"


def make_logger(cfg: DictConfig, overrides, sweep_dir: Optional[str]):
    """Instantiate the configured Lightning logger (None for ``logger=none``). A W&B run is
    named from its overrides, grouped by its sweep (``PACKPTQ_SWEEP_GROUP``, set by ``main``
    from the multirun command line; else the sweep directory's name), keeps the id of its run
    directory (``resume="allow"``) and is started here, before any phase."""
    if cfg.get("logger") is None:
        return None
    lcfg = OmegaConf.to_container(cfg.logger, resolve=True)
    wandb_logger = "Wandb" in lcfg.get("_target_", "")
    if wandb_logger:
        os.environ.setdefault("WANDB_SILENT", "true")
        if lcfg.get("name") is None:
            lcfg["name"] = ",".join(o for o in overrides if not o.startswith(("logger", "hydra"))) or "default"
        if lcfg.get("group") is None and sweep_dir:
            lcfg["group"] = os.environ.get("PACKPTQ_SWEEP_GROUP") or os.path.basename(os.path.normpath(sweep_dir))
        lcfg.setdefault("id", wandb_run_id(cfg.run_dir))
        lcfg.setdefault("resume", "allow")
        lcfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    logger = hydra.utils.instantiate(lcfg, _convert_="all")  # plain dicts: W&B cannot sanitise DictConfig
    if wandb_logger:
        logger.experiment  # noqa: B018  (starts the run now: a failure in any phase is recorded)
    return logger


def run_with_logging(cfg: DictConfig, overrides=(), sweep_dir: Optional[str] = None) -> dict:
    """``pipeline.run`` with the logger around it. A W&B run ends with exit code 0 when the
    job succeeds and 1 when it raises (the exception is re-raised)."""
    from packptq import pipeline

    logger = make_logger(cfg, list(overrides), sweep_dir)
    is_wandb = logger is not None and "Wandb" in type(logger).__name__
    status = "failed"
    try:
        results = pipeline.run(cfg, overrides=overrides, logger=logger)
        if is_wandb:
            logger.experiment.summary.update(_summary(results))
            _wandb_artifacts(logger, cfg.run_dir)
        status = "success"
        return results
    finally:
        if logger is not None:
            try:
                logger.finalize(status)
            except Exception:
                pass
            if is_wandb:
                import wandb

                wandb.finish(exit_code=0 if status == "success" else 1)


def _summary(results: dict) -> dict:
    """The scalar results (and phase times) for the W&B run summary."""
    out = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and k != "run_dir"}
    out.update({f"time/{k}_s": v for k, v in (results.get("time_s") or {}).items()})
    return out


def _wandb_artifacts(logger, run_dir: str) -> None:
    import wandb

    art = wandb.Artifact("packptq-results", type="results")
    for name in ("results.json", "packs.json", "bits.json", "scores.json"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            art.add_file(path)
    logger.experiment.log_artifact(art)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sweep_dir = hc.sweep.dir if hc.mode.name == "MULTIRUN" else None
    try:
        results = run_with_logging(cfg, list(hc.overrides.task), sweep_dir)
    except ConfigError as exc:
        print(f"packptq: error: {exc}", file=sys.stderr)
        if hc.mode.name == "MULTIRUN":
            raise
        sys.exit(2)
    return results["quant_top1"]


def main() -> None:
    # the user config directory (hydra.searchpath in config.yaml) is optional
    warnings.filterwarnings("ignore", message=r".*hydra\.searchpath.*is not available")
    group = sweep_group(sys.argv[1:])
    if group and "PACKPTQ_SWEEP_GROUP" not in os.environ:
        os.environ["PACKPTQ_SWEEP_GROUP"] = group  # inherited by the sweep's jobs
    _app()


def report_main(argv=None) -> None:
    try:
        from packptq import report
    except ImportError as exc:  # pandas / matplotlib are the `report` extra
        print(f"packptq-report: error: {exc.name or exc} is not installed; "
              'install the report extra: pip install "packptq[report]"', file=sys.stderr)
        sys.exit(2)

    sys.exit(report.main(argv))
