"""Entry points: ``packptq`` (the Hydra app) and ``packptq-report``. Thin wrappers: the work
is ``pipeline.run(cfg)``, which returns the results dict."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

import packptq.schemas  # noqa: F401  (the typed bases of conf/<group>/ choice files)
from packptq.config import ConfigError

#: the repository's config tree (packptq is installed editable: `pip install -e .`)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def make_logger(cfg: DictConfig, overrides, sweep_dir: Optional[str]):
    """Instantiate the configured Lightning logger (None for ``logger=none``). W&B runs are
    named from their overrides and grouped by sweep."""
    if cfg.get("logger") is None:
        return None
    lcfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if "Wandb" in lcfg.get("_target_", ""):
        os.environ.setdefault("WANDB_SILENT", "true")
        if lcfg.get("name") is None:
            lcfg["name"] = ",".join(o for o in overrides if not o.startswith(("logger", "hydra"))) or "default"
        if lcfg.get("group") is None and sweep_dir:
            lcfg["group"] = os.path.basename(os.path.normpath(sweep_dir))
        lcfg.setdefault("config", None)
        lcfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    return hydra.utils.instantiate(lcfg, _convert_="all")  # plain dicts: W&B cannot sanitise DictConfig


def run_with_logging(cfg: DictConfig, overrides=(), sweep_dir: Optional[str] = None) -> dict:
    from packptq import pipeline

    logger = make_logger(cfg, list(overrides), sweep_dir)
    try:
        results = pipeline.run(cfg, overrides=overrides, logger=logger)
        if logger is not None and hasattr(logger, "experiment") and "Wandb" in type(logger).__name__:
            _wandb_artifacts(logger, cfg.run_dir)
        return results
    finally:
        if logger is not None:
            try:
                logger.finalize("success")
            except Exception:
                pass
            if "Wandb" in type(logger).__name__:
                import wandb

                wandb.finish()


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
    """One job. Returns the validation top-1 (None without ``data.val_size``): the objective a
    tuning sweeper (``hydra/sweeper=optuna``) maximises, so test data never chooses a setting."""
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
    return results["val_top1"]


def main() -> None:
    _app()


def report_main(argv=None) -> None:
    from packptq import report

    sys.exit(report.main(argv))
