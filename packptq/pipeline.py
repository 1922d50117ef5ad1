"""The phases of a packptq run, in order, each writing its artifact in the run directory and
skipped when that artifact is already there (resume):

fp (train or load the FP model) -> calibrate (quantizers, RTN accuracy) -> score (block
importance) -> pack -> bits (mixed precision) -> recon (unit by unit, ``unit_XX.pt``) -> eval
(``results.json``)."""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from packptq.artifacts import RunDir, file_digest, hash_obj
from packptq.config import ConfigError, typed
from packptq.data import build_datamodule
from packptq.evaluate import forward_all
from packptq.mp import bit_accounting
from packptq.mp import plan as mp_plan_for
from packptq.packing import PackingConfig, hessian_scores, make_packs
from packptq.quant import QuantConfig, QuantLayer, calibrate, freeze, quantize_model, set_quant_state
from packptq.quant.convert import execution_order, fold_bn
from packptq.reconstruct import ActivationCache, ReconConfig, reconstruct_unit
from packptq.train_fp import fp_cache_key, predict, top1, train_or_load
from packptq.zoo import check_split, split_model
from packptq.zoo.build import ModelConfig, build_model

#: config keys that do not change results (excluded from the resume fingerprint)
VOLATILE = ("logger", "trainer", "threads", "progress", "run_dir", "cache_dir", "hydra")


@dataclass
class Unit:
    key: str  # e.g. prefix_00, pack_03, layer_12, suffix_00 (the logging namespace)
    segment: str  # prefix | blocks | suffix
    blocks: List[int]  # block indices the unit spans (the block holding a layer unit)
    layer: Optional[str] = None  # dotted QuantLayer name for layer units
    names: List[str] = field(default_factory=list)  # module names trained in this unit


class Timer:
    def __init__(self) -> None:
        self.times: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 3)


def _device(trainer_cfg) -> torch.device:
    acc = str((trainer_cfg or {}).get("accelerator", "auto"))
    return torch.device("cuda") if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def capture(fn: Callable, x: torch.Tensor, module: nn.Module, bs: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of ``module`` while ``fn`` runs over x, on the CPU."""
    ins, outs = [], []

    def hook(_m, i, o):  # clone: later in-place ops (ReLU(inplace=True)) would alter them
        ins.append(i[0].detach().clone().cpu())
        outs.append(o.detach().clone().cpu())

    h = module.register_forward_hook(hook)
    try:
        for i in range(0, len(x), bs):
            fn(x[i:i + bs].to(device))
    finally:
        h.remove()
    return torch.cat(ins), torch.cat(outs)


class _Chain(nn.Sequential):
    """Consecutive blocks run as one unit (a pack)."""


def _channel_dim(unit_module: nn.Module) -> int:
    layers = [m for m in unit_module.modules() if isinstance(m, QuantLayer)]
    return -1 if layers and isinstance(layers[-1].layer, nn.Linear) else 1


def _is_fp_param(key: str) -> bool:
    # FP weights and biases never change during PTQ: they come from the FP model, not artifacts
    return key.endswith((".layer.weight", ".layer.bias")) or not any(
        t in key for t in ("wq.", "aq.", "_quant.", "alpha", "scale", "zero_point", "initialized", "elems_per_sample"))


def unit_state(module: nn.Module) -> dict:
    """What PTQ changed in ``module``: quantizer parameters, and AdaRound's hard rounding
    decisions stored as booleans (only the sign of V matters once frozen)."""
    out = {}
    for k, v in module.state_dict().items():
        if _is_fp_param(k):
            continue
        out[k] = (v >= 0) if k.endswith("alpha") else v.detach().cpu()
    return out


def load_unit_state(module: nn.Module, sd: dict) -> None:
    """Restore a reconstructed unit (creating its AdaRound variables first) and freeze it."""
    for name, m in module.named_modules():
        key = f"{name}.alpha" if name else "alpha"
        if hasattr(m, "init_adaround") and key in sd:
            m.alpha = nn.Parameter(torch.zeros(sd[key].shape), requires_grad=False)
            m.mode = "hard"
    sd = {k: (v.float() * 2 - 1 if k.endswith("alpha") else v) for k, v in sd.items()}
    res = module.load_state_dict(sd, strict=False)
    if res.unexpected_keys or any(not _is_fp_param(k) for k in res.missing_keys):
        raise ValueError(f"unit artifact does not match the model: missing {res.missing_keys[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    freeze(module)


def plan_units(policy: str, packs: List[List[int]], prefix_layers: List[str], block_layers: List[List[str]],
               suffix_layers: List[str], block_names: List[str]) -> List[Unit]:
    """Reconstruction order: prefix layers one by one, packs (or every layer for `layer`) in
    order, suffix layers one by one. `none` reconstructs nothing."""
    if policy == "none":
        return []
    units = [Unit(f"prefix_{i:02d}", "prefix", [], n, [n]) for i, n in enumerate(prefix_layers)]
    if policy == "layer":
        k = 0
        for b, layers in enumerate(block_layers):
            for n in layers:
                units.append(Unit(f"layer_{k:02d}", "blocks", [b], n, [n]))
                k += 1
    else:
        for j, p in enumerate(packs):
            units.append(Unit(f"pack_{j:02d}", "blocks", list(p), None, [block_names[b] for b in p]))
    units += [Unit(f"suffix_{i:02d}", "suffix", [], n, [n]) for i, n in enumerate(suffix_layers)]
    return units


def layer_groups(qmodel: nn.Module, qsplit, x: torch.Tensor) -> Tuple[List[str], List[List[str]], List[str]]:
    """QuantLayer names of the prefix, of each block, and of the suffix, in execution order."""
    order = execution_order(qmodel, x)
    prefixes = [n + "." for n in qsplit.block_names]
    block_layers = [[o for o in order if o.startswith(p)] for p in prefixes]
    inside = {o for bl in block_layers for o in bl}
    outside = [o for o in order if o not in inside]
    with torch.no_grad():
        pre_order = execution_order(_Runner(qsplit.prefix, qmodel), x)
    prefix_layers = [o for o in outside if o in pre_order]
    suffix_layers = [o for o in outside if o not in pre_order]
    return prefix_layers, block_layers, suffix_layers


class _Runner(nn.Module):
    """Exposes ``model``'s modules by name while running only ``fn`` (for hook discovery)."""

    def __init__(self, fn: Callable, model: nn.Module) -> None:
        super().__init__()
        self.fn, self.model = fn, model

    def named_modules(self, *a, **k):
        return self.model.named_modules(*a, **k)

    def forward(self, x):
        return self.fn(x)


def _quantize_target(qcfg: QuantConfig) -> dict:
    return {k: getattr(qcfg, k) for k in ("w_bits", "a_bits", "first_last_bits", "act_placement", "w_range",
                                          "a_range", "attn_prob", "quant_attn", "ln_reparam")}


def run(cfg: DictConfig, overrides: Optional[Sequence[str]] = None, logger=None) -> dict:
    """Run every phase for ``cfg`` (the composed Hydra config) and return the results dict."""
    timer = Timer()
    seed = int(cfg.seed)
    _quiet_lightning()
    _set_threads(cfg.get("threads"))
    progress = bool(cfg.get("progress", True))
    # -- validate every section before any heavy work ---------------------------------------
    qcfg = typed(QuantConfig, cfg.quant, "quant")
    rcfg = typed(ReconConfig, cfg.recon, "recon")
    pcfg = typed(PackingConfig, cfg.packing, "packing")
    mcfg = typed(ModelConfig, cfg.model, "model")
    mp_plan = mp_plan_for(cfg.get("mp"), qcfg)
    dm = build_datamodule(cfg.data)
    meta = dm.meta()
    rd = RunDir(cfg.run_dir)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") else {}
    trainer_kwargs.pop("_target_", None)
    _check_trainer_kwargs(trainer_kwargs)
    device = _device(trainer_kwargs)
    eval_bs = int(cfg.data.get("batch_size", 256))

    with timer.phase("fp"):
        torch.manual_seed(dm.cfg.seed)  # FP init follows the data seed: one FP model for all run seeds
        model = build_model(mcfg, meta)
        dm.attach_model(model)
        dm.setup()
        x_cal, y_cal = dm.calib_tensors()
        split = split_model(model, mcfg.family, example_input=x_cal[:2])
        if mp_plan is not None:  # an impossible bit budget stops here, before FP training
            mp_plan.check_feasible(model, split)
        check_split(model, split, x_cal[:2], atol=1e-4)
        calib_fp = dm.fingerprint()
        cfg_dict = OmegaConf.to_container(cfg, resolve=True)
        # the FP model's cache key carries its training-code version: a retrained FP model
        # under the same config must not resume on artifacts computed from the old one
        trains_fp = not (mcfg.checkpoint or mcfg.pretrained)
        # ... and a checkpoint's content: a new file under the same path is a different model
        fp_key = fp_cache_key(mcfg, dm.cfg) if trains_fp else file_digest(mcfg.checkpoint) if mcfg.checkpoint else None
        resumed = rd.guard(hash_obj({**cfg_dict, "_fp_model": fp_key}, VOLATILE), calib_fp)
        if trains_fp:
            model, fp_path = train_or_load(model, dm, mcfg, dm.cfg, Path(cfg.cache_dir), trainer_kwargs)
        model.to(device).eval()
        if rd.has("fp.json"):
            fp_top1 = rd.read_json("fp.json")["fp_top1"]
            fp_preds = torch.tensor(rd.read_json("fp.json")["preds"])
        else:
            fp_preds, labels = predict(model, dm.test_dataloader(), device)
            fp_top1 = top1(fp_preds, labels, meta["num_classes"])
            rd.write_json("fp.json", {"fp_top1": fp_top1, "preds": fp_preds.tolist()})
        _log(logger, {"eval/fp_top1": fp_top1})
    print(f"[packptq] {mcfg.name} on {dm.cfg.name}: FP top-1 {fp_top1:.2f}%  ({'resuming ' if resumed else ''}run dir {rd.path})")

    with timer.phase("calibrate"):
        fp_ref = copy.deepcopy(model).eval()
        fold_bn(fp_ref)  # the reconstruction targets use the same folded weights
        qmodel = copy.deepcopy(model)
        quantize_model(qmodel, qcfg, x_cal[:2].to(device))
        qsplit, fsplit = split_model(qmodel, split.family), split_model(fp_ref, split.family)
        torch.manual_seed(seed)
        calibrate(qmodel, x_cal, batch_size=eval_bs, method=qcfg.a_range)
        prefix_layers, block_layers, suffix_layers = layer_groups(qmodel, qsplit, x_cal[:2].to(device))
        rtn = _cached_eval(rd, "rtn.json", qmodel, dm, device, fp_preds, meta)
        rd.save_pt("calib.pt", unit_state(qmodel))
    print(f"[packptq] W{qcfg.w_bits}A{qcfg.a_bits} RTN top-1 {rtn['top1']:.2f}%")
    del model, split  # the unfolded FP network: fp_ref and qmodel are what the phases below use

    scores = None
    if pcfg.needs_scores or (mp_plan is not None and mp_plan.needs_omega):
        with timer.phase("score"):
            key = f"scores_{pcfg.loss}.json"
            if rd.has(key):
                scores = rd.read_json(key)
            else:
                scores = hessian_scores(fsplit, qsplit, x_cal.to(device), y_cal.to(device), pcfg.loss,
                                        batch_size=min(eval_bs, 128), progress=progress)
                rd.write_json(key, scores)
            rd.write_json("scores.json", scores)
            _log_table(logger, "packing/scores", ["block", "S", "omega"],
                       [[n, s, o] for n, s, o in zip(scores["names"], scores["S"], scores["omega"])])

    with timer.phase("pack"):
        names = qsplit.block_names
        packs = make_packs(pcfg, names, scores["S"] if scores else None, seed)
        if not packs and pcfg.policy != "none":
            packs = [[i] for i in range(len(names))]
        rd.write_json("packs.json", {"policy": pcfg.policy, "packs": [[names[i] for i in p] for p in packs]})
        _log_table(logger, "packing/packs", ["pack", "blocks"], [[j, " ".join(names[i] for i in p)] for j, p in enumerate(packs)])

    with timer.phase("bits"):
        pack_bits = None
        if mp_plan is not None:
            twins = SimpleNamespace(qmodel=qmodel, qsplit=qsplit, fsplit=fsplit, device=device,
                                    prefix_layers=prefix_layers, block_layers=block_layers,
                                    suffix_layers=suffix_layers)
            pack_bits = mp_plan.allocate(rd, twins, packs, scores, x_cal, progress=progress)
            mp = mp_plan.describe()
            _log(logger, {"mp/achieved_w_bits": mp["achieved_w_bits"], "mp/budget_avg_bits": mp["avg_bits"]})
            _log_table(logger, "mp/bits", ["pack", "blocks", "w_bits", "a_bits"],
                       [[j, " ".join(names[b] for b in p), w, a] for j, (p, w, a)
                        in enumerate(zip(packs or [[b] for b in range(len(names))], pack_bits,
                                         mp["a_bits"]))])
        acct = bit_accounting(qmodel)
        print(f"[packptq] bits: average weight {acct['w_bits_avg']:.4f}, activation "
              f"{acct['a_bits_avg'] if acct['a_bits_avg'] is None else round(acct['a_bits_avg'], 4)}, "
              f"size {acct['size_bytes']} bytes over {acct['n_weights']} weights")

    units = plan_units(pcfg.policy, packs, prefix_layers, block_layers, suffix_layers, names)
    with timer.phase("recon"):
        unit_losses = _reconstruct(units, qmodel, fp_ref, qsplit, fsplit, x_cal, rcfg, rd, seed, device,
                                   trainer_kwargs, logger, progress)

    with timer.phase("eval"):
        final_preds, labels = predict(qmodel, dm.test_dataloader(), device)
        quant_top1 = top1(final_preds, labels, meta["num_classes"])
        agreement = float((final_preds == fp_preds).float().mean()) * 100.0
    results = {
        "model": mcfg.name, "data": dm.cfg.name, "seed": seed,
        "quant": _quantize_target(qcfg),
        "packing": {"policy": pcfg.policy, "loss": pcfg.loss},
        "mp": mp_plan.describe() if mp_plan is not None else {"policy": "none"},
        "fp_top1": fp_top1, "rtn_top1": rtn["top1"], "quant_top1": quant_top1, "agreement": agreement,
        "rtn_agreement": rtn["agreement"],
        **acct,
        "units": [u.names for u in units], "unit_keys": [u.key for u in units],
        "packs": [[names[i] for i in p] for p in packs], "bits": pack_bits,
        "scores": scores["S"] if scores else None, "omega": scores["omega"] if scores else None,
        "recon_loss": {k: [v[0], v[-1]] for k, v in unit_losses.items() if v},
        "time_s": timer.times, "calib_fingerprint": calib_fp, "calib_size": len(x_cal),
        "overrides": list(overrides or []), "config": cfg_dict, "run_dir": str(rd.path),
    }
    rd.write_json("results.json", results)
    _log(logger, {"eval/quant_top1": quant_top1, "eval/rtn_top1": rtn["top1"], "eval/agreement": agreement,
                  "eval/w_bits_avg": acct["w_bits_avg"], "eval/a_bits_avg": acct["a_bits_avg"] or 0.0,
                  "eval/size_bytes": acct["size_bytes"]})
    print_table(results)
    return results


def _quiet_lightning() -> None:
    """Each unit is one Trainer.fit: keep Lightning's per-fit banners and known-benign warnings
    (eval-mode units, its own deprecations) out of the run's output."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pat in (".*module\\(s\\) in eval mode.*", ".*LeafSpec.*", ".*does not have many workers.*",
                ".*litlogger.*", ".*GPU available.*"):
        warnings.filterwarnings("ignore", message=pat)


def _check_trainer_kwargs(kwargs: dict) -> None:
    import inspect

    import lightning as L

    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    bad = sorted(set(kwargs) - known)
    if bad:
        raise ConfigError(f"unknown trainer option(s) {bad}; trainer.* takes lightning.Trainer arguments")


def _set_threads(threads) -> None:
    """Torch threads: the config's, else one per job under submitit's local executor (jobs of a
    sweep run side by side), else the SLURM allocation's CPUs, else torch's default."""
    import os

    if threads in (None, "", "null"):
        if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
            threads = 1
        else:
            threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        torch.set_num_threads(int(threads))


def _cached_eval(rd: RunDir, name: str, qmodel, dm, device, fp_preds, meta) -> dict:
    if rd.has(name):
        return rd.read_json(name)
    preds, labels = predict(qmodel, dm.test_dataloader(), device)
    out = {"top1": top1(preds, labels, meta["num_classes"]), "agreement": float((preds == fp_preds).float().mean()) * 100}
    rd.write_json(name, out)
    return out


def _reconstruct(units, qmodel, fp_ref, qsplit, fsplit, x, rcfg, rd, seed, device, trainer_kwargs, logger, progress):
    """Sequential reconstruction: keep the quantized-model and FP activations at the current
    position over the calibration set, fit each unit from its cache, freeze it, advance."""
    losses: Dict[str, List[float]] = {}
    if not units:
        return losses
    bs = 256
    q_h, f_h = x, x
    qblocks, fblocks = [b for _, b in qsplit.blocks], [b for _, b in fsplit.blocks]
    bar = tqdm(total=len(units), desc="reconstruct", disable=not progress)
    step_offset = 0

    def fit(i: int, u: Unit, module: nn.Module, cache_fn: Callable[[], ActivationCache]):
        nonlocal step_offset
        name = f"unit_{i:02d}.pt"
        bar.set_postfix_str(u.key)
        ucfg = rcfg
        if rcfg.iters_per == "block" and u.layer is None and len(u.blocks) > 1:
            ucfg = replace(rcfg, iters=rcfg.iters * len(u.blocks))
        if rd.has(name):
            load_unit_state(module, rd.load_pt(name))
        else:
            cache = cache_fn()
            ls = reconstruct_unit(module, cache, ucfg, u.key, seed * 1000 + i, _channel_dim(module),
                                  trainer_kwargs, logger, step_offset)
            losses[u.key] = ls
            del cache
            module.to(device)
            rd.save_pt(name, unit_state(module))
            rd.write_json(f"unit_{i:02d}.json", {"key": u.key, "names": u.names, "loss": ls[:: max(1, len(ls) // 50)]})
        step_offset += ucfg.iters
        bar.update(1)

    qmodel.to(device)
    fp_ref.to(device)
    i = 0
    # prefix layers
    while i < len(units) and units[i].segment == "prefix":
        u = units[i]
        ql, fl = qmodel.get_submodule(u.layer), fp_ref.get_submodule(u.layer)
        fit(i, u, ql, lambda: _layer_cache(qsplit.prefix, fsplit.prefix, ql, fl, q_h, f_h, bs, device, rcfg))
        i += 1
    q_h, f_h = forward_all(qsplit.prefix, q_h, bs, device), forward_all(fsplit.prefix, f_h, bs, device)
    # blocks: packs, or the layers of each block
    while i < len(units) and units[i].segment == "blocks":
        u = units[i]
        span = u.blocks
        if u.layer is None:
            chain_q = _Chain(*[qblocks[b] for b in span])
            chain_f = _Chain(*[fblocks[b] for b in span])
            f_out = None

            def pack_cache():
                nonlocal f_out
                f_out = forward_all(chain_f, f_h, bs, device)
                return ActivationCache(q_h, f_h, f_out, rcfg.cache_dtype)

            fit(i, u, chain_q, pack_cache)
            i += 1
        else:
            b = span[0]
            while i < len(units) and units[i].segment == "blocks" and units[i].blocks == [b]:
                uu = units[i]
                ql, fl = qmodel.get_submodule(uu.layer), fp_ref.get_submodule(uu.layer)
                fit(i, uu, ql, lambda: _layer_cache(qblocks[b], fblocks[b], ql, fl, q_h, f_h, bs, device, rcfg))
                i += 1
            chain_q, chain_f, f_out = qblocks[b], fblocks[b], None
        q_h = forward_all(chain_q, q_h, bs, device)
        f_h = f_out if f_out is not None else forward_all(chain_f, f_h, bs, device)
    # suffix layers
    while i < len(units):
        u = units[i]
        ql, fl = qmodel.get_submodule(u.layer), fp_ref.get_submodule(u.layer)
        fit(i, u, ql, lambda: _layer_cache(qsplit.suffix, fsplit.suffix, ql, fl, q_h, f_h, bs, device, rcfg))
        i += 1
    bar.close()
    qmodel.eval()
    return losses


def _layer_cache(q_fn, f_fn, qlayer, flayer, q_h, f_h, bs, device, rcfg) -> ActivationCache:
    q_in, _ = capture(q_fn, q_h, qlayer, bs, device)
    f_in, f_out = capture(f_fn, f_h, flayer, bs, device)
    return ActivationCache(q_in, f_in, f_out, rcfg.cache_dtype)


def _log(logger, metrics: dict) -> None:
    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if v is not None})


def _log_table(logger, key: str, columns: List[str], rows: List[list]) -> None:
    if logger is not None and hasattr(logger, "log_table"):
        try:
            logger.log_table(key=key, columns=columns, data=rows)
        except Exception:  # tables are a nicety; never fail a run on them
            pass


def print_table(r: dict) -> None:
    q = r["quant"]
    rows = [
        ("model / data", f"{r['model']} / {r['data']} (seed {r['seed']})"),
        ("quantization", f"W{q['w_bits']}A{q['a_bits']}, first/last {q['first_last_bits']}, acts at layer {q['act_placement']}s"),
        ("packing", f"{r['packing']['policy']} ({len(r['units'])} units, {len(r['packs'])} packs)"),
        ("FP top-1", f"{r['fp_top1']:.2f}%"),
        ("RTN top-1 (init only)", f"{r['rtn_top1']:.2f}%"),
        ("quantized top-1", f"{r['quant_top1']:.2f}%  (agreement with FP {r['agreement']:.1f}%)"),
        ("avg weight / act bits", f"{r['w_bits_avg']:.3f} / {r['a_bits_avg'] if r['a_bits_avg'] is None else round(r['a_bits_avg'], 3)}"),
        ("size", f"{r['size_bytes'] / 1024:.1f} KiB"),
    ] + [(f"time {k}", f"{v:.1f} s") for k, v in r["time_s"].items()]
    w = max(len(a) for a, _ in rows)
    print("\n".join(f"  {a.ljust(w)}  {b}" for a, b in rows))
