"""A packptq run: the phases in order. Each phase lives in its own module and writes its
artifact in the run directory; a resumed run reads the artifacts it finds instead of
recomputing them.

fp (``fp``: build, train or load; ``fp.json``) -> calibrate (``calibration``: quantized and FP
twins; ``rtn.json``) -> score (``scores``: block importance; ``scores.json``) -> pack
(``packing``; ``packs.json``) -> bits (``mp``: mixed precision; ``bits.json``) -> recon
(``recon``: unit by unit; ``unit_XX.pt``) -> eval (``results.json``)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from packptq import export, fp, mp
from packptq.artifacts import RunDir, code_version, flatten, hash_obj
from packptq.calibration import calibrate_twins
from packptq.config import ConfigError, typed
from packptq.data import build_datamodule
from packptq.evaluate import evaluate, predict, print_table, top1
from packptq.packing import PackingConfig, make_packs
from packptq.quant import QuantConfig
from packptq.quant.quantizer import RANGE_NORM
from packptq.recon import ReconConfig, ReconSequence, plan_units
from packptq.recon.sequence import check_cache_budget
from packptq.runtime import (Timer, autocast, check_seed, device_of, log_metrics, log_table, quiet_lightning,
                             set_threads, trainer_kwargs)
from packptq.scores import hessian_scores
from packptq.twins import Twins
from packptq.zoo.build import ModelConfig

#: config keys that do not change results (excluded from the resume fingerprint). The trainer
#: section is replaced by what of it changes results (precision, the device type); the data's
#: location and loader workers are left out (its content enters through the calibration
#: fingerprint and the FP model's identity).
VOLATILE = ("logger", "trainer", "threads", "progress", "run_dir", "cache_dir", "hydra", "export")
VOLATILE_DATA = ("path", "num_workers")


def fingerprint_items(cfg_dict: dict, trainer_kw: dict, device: torch.device, fp_identity) -> dict:
    """The flat config that identifies a run's results: every key outside VOLATILE, the
    trainer's precision and device type, the FP model's identity."""
    items = {k: v for k, v in cfg_dict.items() if k not in VOLATILE}
    items["data"] = {k: v for k, v in (items.get("data") or {}).items() if k not in VOLATILE_DATA}
    items["trainer"] = {"precision": str(trainer_kw.get("precision", "32-true")), "device": device.type}
    items["_fp_model"] = fp_identity
    return flatten(items)


@dataclass
class Quantized:
    """What the phases up to reconstruction hand to the evaluation (and to export): the twins
    (``twins.qmodel`` is the quantized model), the datamodule, and every phase's output."""

    twins: Twins
    dm: object
    timer: Timer
    device: torch.device
    qcfg: QuantConfig
    pcfg: PackingConfig
    mcfg: ModelConfig
    mp_plan: object
    fp_top1: float
    fp_preds: torch.Tensor
    rtn: dict
    info: dict  # quantize_phases' output: scores, packs, pack_bits, acct, units, unit_losses
    x_cal: torch.Tensor
    cfg_dict: dict
    rd: RunDir
    fp_val_top1: Optional[float] = None
    val_loader: object = None
    prior_times: Optional[dict] = None  # phase times of earlier processes on this run directory
    trainer_kw: dict = field(default_factory=dict)  # the validated trainer section (precision, device)


def run(cfg: DictConfig, overrides: Optional[Sequence[str]] = None, logger=None) -> dict:
    """Run every phase for ``cfg`` (the composed Hydra config) and return the results dict."""
    if cfg.get("export") not in (None, *export.FORMATS):
        raise ConfigError(f"export={cfg.export}; use {'|'.join(export.FORMATS)} or null")
    code = code_version()  # the code as loaded now, before a checkout can move under the run
    qz = quantized(cfg, logger)
    twins, dm, device, qcfg, pcfg, mcfg, info = qz.twins, qz.dm, qz.device, qz.qcfg, qz.pcfg, qz.mcfg, qz.info
    with qz.timer.phase("eval"), autocast(qz.trainer_kw, device):
        final = evaluate(twins.qmodel, dm.test_dataloader(), device, qz.fp_preds, dm.meta()["num_classes"],
                         qz.val_loader)
    scores, packs, names, acct, rtn = info["scores"], info["packs"], twins.block_names, info["acct"], qz.rtn
    results = {
        "model": mcfg.name, "data": dm.cfg.name, "seed": int(cfg.seed),
        "quant": {k: getattr(qcfg, k) for k in ("w_bits", "a_bits", "first_last_bits", "act_placement", "w_range",
                                                 "a_range", "attn_prob", "quant_attn", "ln_reparam")}
                 | {"range_norm": RANGE_NORM},
        "packing": {"policy": pcfg.policy, "loss": pcfg.loss},
        "mp": qz.mp_plan.describe() if qz.mp_plan is not None else {"policy": "none"},
        "fp_top1": qz.fp_top1, "rtn_top1": rtn["top1"], "quant_top1": final["top1"], "agreement": final["agreement"],
        "rtn_agreement": rtn["agreement"],
        "val_size": dm.cfg.val_size, "fp_val_top1": qz.fp_val_top1, "rtn_val_top1": rtn.get("val_top1"),
        "val_top1": final["val_top1"],
        **acct,
        "units": [u.names for u in info["units"]], "unit_keys": [u.key for u in info["units"]],
        "packs": [[names[i] for i in p] for p in packs], "bits": info["pack_bits"],
        "scores": scores["S"] if scores else None, "omega": scores["omega"] if scores else None,
        "recon_loss": {k: [v[0], v[-1]] for k, v in info["unit_losses"].items() if v},
        "time_s": _add(qz.prior_times or {}, qz.timer.times), "fingerprint": qz.rd.run_fp,
        "calib_fingerprint": dm.fingerprint(), "calib_size": len(qz.x_cal),
        "overrides": list(overrides or []), "config": qz.cfg_dict, "run_dir": str(qz.rd.path),
        "packptq": code,
    }
    if cfg.get("export"):  # export=pt|onnx: the deployable artefact beside the results
        results["export"] = export_run(qz, str(cfg.export))
    qz.rd.write_json("results.json", results)
    log_metrics(logger, {"eval/quant_top1": final["top1"], "eval/rtn_top1": rtn["top1"], "eval/val_top1": final["val_top1"],
                         "eval/agreement": final["agreement"], "eval/w_bits_avg": acct["w_bits_avg"],
                         "eval/a_bits_avg": acct["a_bits_avg"] or 0.0, "eval/size_bytes": acct["size_bytes"],
                         **{f"time/{k}_s": v for k, v in qz.timer.times.items()},
                         **{f"recon_loss/{k}": v[-1] for k, v in info["unit_losses"].items() if v}})
    print_table(results)
    return results


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
    rec = export.recipe(qz.mcfg, qz.dm.meta(), qz.qcfg, qz.x_cal[:2].shape)
    res = export.export_quantized(qz.twins.qmodel, rec, fmt, out or export.default_path(qz.rd.path, fmt),
                                  torch.cat(xs)[:n_check])
    fp_file = fp.weights_file(qz.mcfg, qz.dm, qz.cfg_dict["cache_dir"])
    res["fp_bytes"] = fp_file.stat().st_size if fp_file is not None and fp_file.is_file() else None
    print(f"[packptq] export {fmt}: {res['path']} ({res['bytes']} bytes; FP weights {res['fp_bytes']} bytes); "
          f"top-1 agreement with the quantized model {res['agreement']:.2f}% on {res['n']} test inputs")
    return res


def quantized(cfg: DictConfig, logger=None) -> Quantized:
    """The phases fp .. recon for ``cfg``: the quantized model of the run in ``cfg.run_dir``
    (a finished run directory is read back: every phase finds its artifact)."""
    seed, progress = check_seed(cfg.seed), bool(cfg.get("progress", True))
    quiet_lightning()
    set_threads(cfg.get("threads"))
    # every section is validated before any heavy work
    qcfg = typed(QuantConfig, cfg.quant, "quant")
    rcfg = typed(ReconConfig, cfg.recon, "recon")
    pcfg = typed(PackingConfig, cfg.packing, "packing")
    mcfg = typed(ModelConfig, cfg.model, "model")
    mp_plan = mp.plan(cfg.mp, qcfg)
    if mp_plan is not None:
        mp_plan.check_score_loss(pcfg.loss)
    needs_scores = pcfg.needs_scores or (mp_plan is not None and mp_plan.needs_omega)
    unused = pcfg.unused_options(needs_scores)
    if unused:
        raise ConfigError(f"packing.{unused[0]} has no effect with packing={pcfg.policy}"
                          f"{'' if needs_scores else ' (no block scores are computed)'}; remove it")
    dm = build_datamodule(cfg.data)
    trainer_kw = trainer_kwargs(cfg.get("trainer"))
    device = device_of(trainer_kw)
    rd = RunDir(cfg.run_dir)
    bs = dm.cfg.batch_size  # every forward pass over a tensor set
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    prior: dict = {}  # this run directory's phase times in earlier processes

    def persist_times(mine: dict) -> None:
        if rd.run_fp is not None and rd.written - {"times.json"}:  # a resume refused before any new work writes nothing
            rd.write_json("times.json", {"prior": prior, "time_s": _add(prior, mine)})

    timer = Timer(persist_times)
    num_classes = dm.meta()["num_classes"]
    with timer.phase("fp"):
        model = fp.build(mcfg, dm)
        dm.setup()
        x_cal, y_cal = dm.calib_tensors()  # reads every calibration sample: a corrupt one stops here
        val_loader = dm.val_dataloader() if dm.cfg.val_size else None  # choices are made on it, never on test
        split = fp.split(model, mcfg, x_cal[:2])
        if mp_plan is not None:  # an impossible bit budget stops here, before FP training
            mp_plan.check_feasible(model, split)
        # an impossible cache budget stops here too, before FP training
        check_cache_budget(rcfg, pcfg.entry.units, split, x_cal, shutil.disk_usage(rd.path).free)
        items = fingerprint_items(cfg_dict, trainer_kw, device, fp.identity(mcfg, dm, trainer_kw))
        resumed = rd.guard(hash_obj(items), dm.fingerprint(), items)
        if rd.has("times.json"):
            prior.update(rd.read_json("times.json").get("time_s", {}))
        fp_file = fp.cache_path(mcfg, dm, cfg.cache_dir, trainer_kw) if fp.trains(mcfg) else None
        if fp_file is not None and not fp_file.is_file():
            fp.check_trainable(mcfg, dm)  # before any training: zero steps, an unwritable cache
            fp.check_writable(fp_file.parent)
        model = fp.obtain(model, dm, mcfg, cfg.cache_dir, trainer_kw, logger, progress).to(device)

        def fp_eval() -> dict:
            with autocast(trainer_kw, device):
                preds, labels = predict(model, dm.test_dataloader(), device)
                val = None if val_loader is None else top1(*predict(model, val_loader, device), num_classes)
            return {"fp_top1": top1(preds, labels, num_classes), "fp_val_top1": val, "preds": preds.tolist()}

        fp_res = rd.cached_json("fp.json", fp_eval)
        fp_top1, fp_preds = fp_res["fp_top1"], torch.tensor(fp_res["preds"])
        fp.check_not_chance(fp_top1, num_classes, fp.trains(mcfg),
                            fp_file)
        log_metrics(logger, {"eval/fp_top1": fp_top1})
    print(f"[packptq] {mcfg.name} on {dm.cfg.name}: FP top-1 {fp_top1:.2f}%  "
          f"({'resuming ' if resumed else ''}run dir {rd.path})")

    rtn = {}

    def rtn_eval(twins: Twins) -> dict:
        with autocast(trainer_kw, device):
            return evaluate(twins.qmodel, dm.test_dataloader(), device, fp_preds, num_classes, val_loader)

    def after_calibrate(twins: Twins) -> None:
        rtn.update(rd.cached_json("rtn.json", lambda: rtn_eval(twins)))
        print(f"[packptq] W{qcfg.w_bits}A{qcfg.a_bits} RTN top-1 {rtn['top1']:.2f}%")

    twins, info = quantize_phases(model, split, x_cal, y_cal, qcfg, pcfg, rcfg, mp_plan, rd, seed, bs,
                                  trainer_kw, device, timer, logger, progress, after_calibrate)
    return Quantized(twins, dm, timer, device, qcfg, pcfg, mcfg, mp_plan, fp_top1, fp_preds, rtn, info,
                     x_cal, cfg_dict, rd, fp_res.get("fp_val_top1"), val_loader, prior, trainer_kw)


def quantize_phases(model: nn.Module, split, x_cal: torch.Tensor, y_cal: torch.Tensor, qcfg: QuantConfig,
                    pcfg: PackingConfig, rcfg: ReconConfig, mp_plan, rd: RunDir, seed: int, bs: int,
                    trainer_kw: dict, device: torch.device, timer: Timer, logger=None, progress: bool = False,
                    after_calibrate: Optional[Callable[[Twins], None]] = None) -> Tuple[Twins, dict]:
    """The phases calibrate .. recon on the FP ``model`` (``split`` its blocks; ``model`` is
    consumed): the twins and a dict of what the phases found (scores, packs, pack_bits, acct,
    units, unit_losses). ``after_calibrate(twins)`` runs on the initialised (RTN) model.
    Calibration, scoring and the bit allocation's forwards run under the trainer's precision
    (``runtime.autocast``); each unit's fit under the Trainer's own."""
    with timer.phase("calibrate"), autocast(trainer_kw, device):
        twins = calibrate_twins(model, split.family, qcfg, x_cal, seed, bs, device, progress)
        del model, split  # the unfolded FP network: the twins are what the phases below use
        if after_calibrate is not None:
            after_calibrate(twins)

    scores = None
    if pcfg.needs_scores or (mp_plan is not None and mp_plan.needs_omega):  # checked in quantized()
        with timer.phase("score"), autocast(trainer_kw, device):
            scores = rd.cached_json("scores.json", lambda: hessian_scores(
                twins.fsplit, twins.qsplit, x_cal, y_cal, pcfg.loss, batch_size=bs, device=device,
                progress=progress))
            log_table(logger, "packing/scores", ["block", "S", "omega"],
                      [list(r) for r in zip(scores["names"], scores["S"], scores["omega"])])

    names = twins.block_names
    with timer.phase("pack"):
        packs = make_packs(pcfg, names, scores["S"] if scores else None, seed)
        rd.record("packs.json", {"policy": pcfg.policy, "packs": [[names[i] for i in p] for p in packs]})
        log_table(logger, "packing/packs", ["pack", "blocks"], [[j, " ".join(names[i] for i in p)]
                                                               for j, p in enumerate(packs)])

    with timer.phase("bits"), autocast(trainer_kw, device):
        pack_bits = None
        if mp_plan is not None:
            pack_bits = mp_plan.allocate(rd, twins, packs, scores, x_cal, progress=progress)
            desc = mp_plan.describe()
            log_metrics(logger, {"mp/achieved_w_bits": desc["achieved_w_bits"], "mp/budget_avg_bits": desc["avg_bits"]})
            log_table(logger, "mp/bits", ["pack", "blocks", "w_bits", "a_bits"],
                      [[j, " ".join(names[b] for b in p), w, a] for j, (p, w, a)
                       in enumerate(zip(packs or [[b] for b in range(len(names))], pack_bits, desc["a_bits"]))])
        acct = mp.bit_accounting(twins.qmodel)
        print(f"[packptq] bits: average weight {acct['w_bits_avg']:.4f}, activation "
              f"{acct['a_bits_avg'] if acct['a_bits_avg'] is None else round(acct['a_bits_avg'], 4)}, "
              f"size {acct['size_bytes']} bytes over {acct['n_weights']} weights")

    units = plan_units(pcfg.entry.units, packs, twins)
    with timer.phase("recon"):
        unit_losses = ReconSequence(twins, units, rcfg, rd, seed, bs, trainer_kw, logger, progress).run(x_cal)

    return twins, {"scores": scores, "packs": packs, "pack_bits": pack_bits, "acct": acct, "units": units,
                   "unit_losses": unit_losses}


def _add(a: dict, b: dict) -> dict:
    """Phase times of two processes on one run directory, summed per phase."""
    return {k: round(a.get(k, 0.0) + b.get(k, 0.0), 3) for k in {**a, **b}}
