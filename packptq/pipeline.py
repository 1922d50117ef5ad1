"""A packptq run: the phases in order. Each phase module has one entry, ``run(ctx, ...)``, that
writes its artifact in the run directory and returns a typed output; a resumed run reads the
artifacts it finds instead of recomputing them.

fp (``fp``: build, train or load; ``fp.json``) -> calibrate (``calibration``: quantized and FP
twins; ``rtn.json`` by ``evaluate``) -> score (``scores``: block importance; ``scores.json``) ->
pack (``packing``; ``packs.json``) -> bits (``mp``: mixed precision; ``bits.json``) -> recon
(``recon``: unit by unit; ``unit_XX.pt``) -> eval (``evaluate``; ``results.json``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from packptq import calibration, evaluate, export, fp, mp, packing, recon, scores
from packptq.artifacts import code_version
from packptq.config import ConfigError
from packptq.context import RunContext, log
from packptq.data import build_datamodule
from packptq.runtime import check_seed, quiet_lightning, set_threads
from packptq.settings import Settings
from packptq.twins import Twins


@dataclass
class PTQResult:
    """The phases score .. recon on calibrated twins: the twins (``twins.qmodel`` is the
    quantized model), the block scores (None when nothing reads them), the packs (lists of
    block indices), the bits phase's output and the recon phase's."""

    twins: Twins
    scores: Optional[scores.Scores]
    packs: list
    bits: mp.Bits
    recon: recon.ReconResult


@dataclass
class Quantized:
    """A run's phases fp .. recon (what evaluation and export read): the context, the typed
    settings, the fp phase's output, the twins, the RTN metrics and the later phases'."""

    ctx: RunContext
    settings: Settings
    fp: fp.FPResult
    twins: Twins
    rtn: evaluate.Metrics
    ptq: PTQResult

    @property
    def dm(self):
        return self.fp.data.dm


def run(cfg: DictConfig, overrides: Optional[Sequence[str]] = None, logger=None) -> dict:
    """Run every phase for ``cfg`` (the composed Hydra config) and return the results dict."""
    if cfg.get("export") not in (None, *export.FORMATS):
        raise ConfigError(f"export={cfg.export}; use {'|'.join(export.FORMATS)} or null")
    code = code_version()  # the code as loaded now, before a checkout can move under the run
    qz = quantized(cfg, logger)
    final = evaluate.run(qz.ctx, qz.twins.qmodel, qz.fp.data, qz.fp.preds, phase="eval")
    results = evaluate.results(qz.ctx, qz.settings, qz.fp, qz.rtn, qz.ptq, final, overrides, cfg.seed, code)
    if qz.settings.recon.eval_rounding == "soft":  # a named diagnostic beside the on-grid number
        results["offgrid"] = evaluate.offgrid(qz.ctx, qz.twins.qmodel, qz.fp.data, qz.fp.preds)
    if cfg.get("export"):  # export=pt|onnx: the deployable artefact beside the results
        results["export"] = export_run(qz, str(cfg.export))
    qz.ctx.rd.write_json("results.json", results)
    evaluate.report(qz.ctx, results)
    return results


def quantized(cfg: DictConfig, logger=None) -> Quantized:
    """The phases fp .. recon for ``cfg``: the quantized model of the run in ``cfg.run_dir``
    (a finished run directory is read back: every phase finds its artifact)."""
    s, dm, ctx = start(cfg, logger)
    fpr = fp.run(ctx, s, dm, cfg.cache_dir)
    twins = calibration.run(ctx, s.quant, *fpr.take(), fpr.x_cal)
    rtn = evaluate.run(ctx, twins.qmodel, fpr.data, fpr.preds, "rtn.json", phase="calibrate",
                       what=f"W{s.quant.w_bits}A{s.quant.a_bits} RTN")
    return Quantized(ctx, s, fpr, twins, rtn, quantize_phases(ctx, s, twins, fpr.x_cal, fpr.y_cal))


def quantize_phases(ctx: RunContext, s: Settings, twins: Twins, x_cal: torch.Tensor, y_cal: torch.Tensor) -> PTQResult:
    """The phases score .. recon on calibrated ``twins`` (calibration inputs ``x_cal`` [n, ...],
    labels ``y_cal`` [n]); the command line and ``packptq.quantize`` both run them."""
    sc = scores.run(ctx, s.packing.loss, twins, x_cal, y_cal) if s.needs_scores else None
    packs = packing.run(ctx, s.packing, twins.block_names, sc.S if sc else None)
    bits = mp.run(ctx, s.mp, twins, packs, sc.omega if sc else None, x_cal)
    return PTQResult(twins, sc, packs, bits, recon.run(ctx, s.recon, s.packing.entry.units, packs, twins, x_cal))


def start(cfg: DictConfig, logger=None) -> Tuple[Settings, object, RunContext]:
    """Process set-up and every check that needs no compute: the seed, the typed sections, the
    datamodule, the trainer section; then the run directory is opened."""
    quiet_lightning()
    set_threads(cfg.get("threads"))
    seed = check_seed(cfg.seed)
    s = Settings.of(cfg)
    dm = build_datamodule(cfg.data)
    ctx = RunContext.create(cfg.run_dir, cfg.get("trainer"), seed, dm.cfg.batch_size, logger,
                            bool(cfg.get("progress", True)), OmegaConf.to_container(cfg, resolve=True))
    return s, dm, ctx


def export_run(qz: Quantized, fmt: str, out=None, n_check: int = 512) -> dict:
    """Export the run's quantized model as ``fmt`` (pt | onnx) to ``out`` (default
    RUN_DIR/quantized.FMT), checked against it on up to ``n_check`` test inputs; the dict of
    ``export.export_quantized`` plus the FP weights file's size (``fp_bytes``)."""
    xs, n = [], 0
    for x, _ in qz.dm.test_dataloader():
        xs.append(x)
        n += len(x)
        if n >= n_check:
            break
    mcfg = qz.settings.model
    rec = export.recipe(mcfg, qz.dm.meta(), qz.settings.quant, qz.fp.x_cal[:2].shape)
    res = export.export_quantized(qz.twins.qmodel, rec, fmt, out or export.default_path(qz.ctx.rd.path, fmt),
                                  torch.cat(xs)[:n_check])
    fp_file = fp.weights_file(mcfg, qz.dm, qz.ctx.config["cache_dir"])
    res["fp_bytes"] = fp_file.stat().st_size if fp_file is not None and fp_file.is_file() else None
    log.info(f"export {fmt}: {res['path']} ({res['bytes']} bytes; FP weights {res['fp_bytes']} bytes); "
             f"top-1 agreement with the quantized model {res['agreement']:.2f}% on {res['n']} test inputs")
    return res
