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
    _app()


def report_main(argv=None) -> None:
    from packptq import report

    sys.exit(report.main(argv))


def export_main(argv=None) -> None:
    """``packptq-export RUN_DIR --format pt|onnx [--out PATH]``: the finished run's quantized
    model (rebuilt from its config, FP weights and ``unit_XX.pt``) as a deployable file."""
    import argparse
    import json

    from packptq import pipeline

    ap = argparse.ArgumentParser(prog="packptq-export", description=export_main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("run_dir")
    ap.add_argument("--format", choices=("pt", "onnx"), default="pt")
    ap.add_argument("--out", default=None, help="output file (default RUN_DIR/quantized.FORMAT)")
    args = ap.parse_args(argv)
    res_file = Path(args.run_dir) / "results.json"
    if not res_file.is_file():
        print(f"packptq-export: error: {res_file} not found (a finished run directory has results.json)", file=sys.stderr)
        sys.exit(2)
    cfg = OmegaConf.create(json.loads(res_file.read_text())["config"])
    cfg.run_dir, cfg.progress, cfg.export = str(args.run_dir), False, None
    try:
        res = pipeline.export_run(pipeline.quantized(cfg), args.format, args.out)
    except ConfigError as exc:
        print(f"packptq-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res))
