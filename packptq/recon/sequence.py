"""The reconstruction sequence: which units are fitted, in which order, and the loop that fits
them one after another.

Order: prefix layers one by one, then the packs in order (or, for layer-wise reconstruction,
every layer of every block), then suffix layers one by one. The loop keeps the quantized-model
and FP activations at the current position over the calibration set; each unit is fitted from
its activation cache, frozen (hard rounding, no drop), saved as ``unit_XX.pt`` and advanced
past, so the next unit's quantized input comes from the final quantized unit. A unit whose file
exists is loaded instead of fitted (resume). Each unit's activation cache is planned before the
first unit (``plan_cache``: size and mode per unit, ``recon.cache_mode`` / ``recon.cache_budget``)
and built in stores of its mode (``packptq.recon.cache``)."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from packptq.config import ConfigError
from packptq.context import RunContext
from packptq.quant import QuantLayer, freeze
from packptq.recon import cost
from packptq.recon.cache import (ActivationCache, CachePlan, FileStore, MakeStore, MemStore, capture_batch,
                                 capture_into, choose_modes, device_free_bytes, forward_into, human, parse_bytes,
                                 plan_table, store_maker)
from packptq.recon.unit import ReconConfig, UnitRun, reconstruct_unit
from packptq.twins import Twins

log = logging.getLogger("packptq")

#: what a reconstruction unit is made of (a packing policy's ``units``)
UNIT_KINDS = ("none", "layers", "packs")
#: folder of the run directory holding disk-mode caches while they are in use
CACHE_DIR = "recon_cache"


@dataclass
class Unit:
    key: str  # e.g. prefix_00, pack_03, layer_12, suffix_00 (the logging namespace)
    segment: str  # prefix | blocks | suffix
    blocks: List[int]  # block indices the unit spans (the block holding a layer unit)
    layer: Optional[str] = None  # dotted QuantLayer name for layer units
    names: List[str] = field(default_factory=list)  # module names trained in this unit


def plan_units(kind: str, packs: List[List[int]], twins: Twins) -> List[Unit]:
    """The units of a run, in reconstruction order. ``kind``: ``none`` (nothing is
    reconstructed), ``layers`` (every QuantLayer inside the blocks is a unit) or ``packs``."""
    if kind == "none":
        return []
    units = [Unit(f"prefix_{i:02d}", "prefix", [], n, [n]) for i, n in enumerate(twins.prefix_layers)]
    if kind == "layers":
        k = 0
        for b, layers in enumerate(twins.block_layers):
            for n in layers:
                units.append(Unit(f"layer_{k:02d}", "blocks", [b], n, [n]))
                k += 1
    else:
        names = twins.block_names
        for j, p in enumerate(packs):
            units.append(Unit(f"pack_{j:02d}", "blocks", list(p), None, [names[b] for b in p]))
    units += [Unit(f"suffix_{i:02d}", "suffix", [], n, [n]) for i, n in enumerate(twins.suffix_layers)]
    return units


def unit_iters(unit: Unit, cfg: ReconConfig) -> int:
    """Steps for ``unit``: ``recon.iters``, times the pack's block count with ``iters_per=block``."""
    if cfg.iters_per == "block" and unit.layer is None and len(unit.blocks) > 1:
        return cfg.iters * len(unit.blocks)
    return cfg.iters


@torch.no_grad()
def check_cache_budget(cfg: ReconConfig, kind: str, split, x: torch.Tensor, disk_free: Optional[int] = None) -> None:
    """Before any heavy compute (``split`` of the FP model, any weights; ``x`` the calibration
    inputs): a ConfigError when ``recon.cache_budget`` cannot hold, in any allowed mode, the
    smallest cache every plan of ``kind`` has: with ``packs``, the pack starting at the first
    block (inputs of the first block, output at least the smallest block output). The exact check
    of every unit is ``ReconSequence.plan_cache``, once the units are known."""
    if kind != "packs" or cfg.cache_budget is None or not split.blocks:
        return
    h = split.prefix(x[:1])
    ends = [h[0].numel()]
    for _, blk in split.blocks:
        h = blk(h)
        ends.append(h[0].numel())
    first = CachePlan("pack_00", len(x), ends[0], ends[0], min(ends[1:]), ends[0])
    choose_modes([first], cfg.cache_mode, parse_bytes(cfg.cache_budget), cfg.batch_size, disk_free)


# -- unit artifacts -------------------------------------------------------------------------
def _is_fp_param(key: str) -> bool:
    # FP weights and biases never change during PTQ: they come from the FP model, not artifacts
    return key.endswith((".layer.weight", ".layer.bias")) or not any(
        t in key for t in ("wq.", "aq.", "_quant.", "alpha", "scale", "zero_point", "initialized", "elems_per_sample"))


#: appended to an ``alpha`` key for the float rounding variables a unit file keeps besides the
#: hard decisions (``recon.eval_rounding=soft`` only: the off-grid diagnostic needs V, not its sign)
SOFT = "_soft"


def unit_state(module: nn.Module, keep_soft: bool = False) -> dict:
    """What PTQ changed in ``module``: quantizer parameters, and AdaRound's hard rounding
    decisions stored as booleans (only the sign of V matters once frozen); with ``keep_soft``
    also V itself (``...alpha_soft``), for the off-grid evaluation."""
    out = {}
    for k, v in module.state_dict().items():
        if _is_fp_param(k):
            continue
        out[k] = (v >= 0) if k.endswith("alpha") else v.detach().cpu()
        if keep_soft and k.endswith("alpha"):
            out[k + SOFT] = v.detach().cpu().float()
    return out


def load_unit_state(module: nn.Module, sd: dict) -> None:
    """Restore a reconstructed unit (creating its AdaRound variables first) and freeze it.
    Where the file keeps V itself (``alpha_soft``), V is restored (its sign is the hard decision)."""
    for name, m in module.named_modules():
        key = f"{name}.alpha" if name else "alpha"
        if hasattr(m, "init_adaround") and key in sd:
            m.alpha = nn.Parameter(torch.zeros(sd[key].shape), requires_grad=False)
            m.mode = "hard"
    soft = {k[: -len(SOFT)]: v for k, v in sd.items() if k.endswith("alpha" + SOFT)}
    sd = {k: (v.float() * 2 - 1 if k.endswith("alpha") else v) for k, v in sd.items()
          if not k.endswith("alpha" + SOFT)}
    for k, v in soft.items():
        if k not in sd or not torch.equal(v >= 0, sd[k] > 0):
            raise ConfigError(f"unit artifact: {k}{SOFT} disagrees with its hard rounding decisions; delete the file")
        sd[k] = v
    res = module.load_state_dict(sd, strict=False)
    if res.unexpected_keys or any(not _is_fp_param(k) for k in res.missing_keys):
        raise ConfigError(f"unit artifact does not match the model: missing {res.missing_keys[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    freeze(module)


def channel_dim(unit_module: nn.Module) -> int:
    """The channel axis of a unit's output: last for a unit ending in a Linear, else 1."""
    layers = [m for m in unit_module.modules() if isinstance(m, QuantLayer)]
    return -1 if layers and isinstance(layers[-1].layer, nn.Linear) else 1


class Chain(nn.Sequential):
    """Consecutive blocks run as one unit (a pack)."""


#: what ``ReconSequence.walk`` calls for each unit: (index, quantized module, FP module,
#: make_cache) -> None
Visit = Callable[[int, nn.Module, nn.Module, Callable[[], ActivationCache]], None]


# -- the loop -------------------------------------------------------------------------------
@dataclass
class ReconResult:
    """The recon phase's output: the ``units`` in order and {unit key: per-step losses}."""

    units: List[Unit]
    losses: Dict[str, List[float]]


def run(ctx: RunContext, cfg: ReconConfig, kind: str, packs: List[List[int]], twins: Twins,
        x: torch.Tensor) -> ReconResult:
    """The recon phase: the units of ``kind`` (the packing policy's ``units``) over ``packs``,
    fitted in order on the calibration inputs ``x`` [n, ...] (``ReconSequence``); each unit's
    fit runs under its Trainer's precision."""
    units = plan_units(kind, packs, twins)
    with ctx.phase("recon", precision=False):
        return ReconResult(units, ReconSequence(ctx, twins, units, cfg).run(x))


@dataclass
class ReconSequence:
    """Fits ``units`` of ``twins`` in order over the calibration inputs ``x`` [n, ...];
    ``ctx`` gives the run directory, seed, forward batch size (cache building), trainer
    settings, logger and progress bar."""

    ctx: RunContext
    twins: Twins
    units: List[Unit]
    cfg: ReconConfig

    @property
    def rd(self):
        return self.ctx.rd

    def run(self, x: torch.Tensor) -> Dict[str, List[float]]:
        """Reconstruct every unit; returns {unit key: per-step losses} (loaded units read their
        losses back from ``unit_XX.json``)."""
        self.losses: Dict[str, List[float]] = {}
        if not self.units:
            return self.losses
        self._prepare(x)  # an impossible cache budget stops here
        self._costs = self._announce(x) if self.cfg.predict else {}  # logged before the bar
        # one tick per optimisation step, so the ETA weighs a unit by its steps, not by its count
        total = sum(unit_iters(u, self.cfg) for u in self.units)
        self._bar = tqdm(total=total, desc=f"reconstruct {len(self.units)} units", unit="step",
                         disable=not self.ctx.progress, dynamic_ncols=True)
        self._step_offset = 0
        self.walk(x, self._fit)
        self._bar.close()
        self.twins.qmodel.eval()
        return self.losses

    def _prepare(self, x: torch.Tensor) -> None:
        t = self.twins
        t.qmodel.to(t.device)
        t.fp.to(t.device)
        self.plans = self.plan_cache(x)

    def walk(self, x: torch.Tensor, visit: Visit) -> None:
        """Go through the units in order over the calibration inputs ``x`` [n, ...], keeping
        the quantized-model and FP activations at the current position: for unit ``i``,
        ``visit(i, q_module, fp_module, make_cache)`` (``make_cache()`` builds its
        ``ActivationCache`` in the unit's planned mode), then the quantized activations advance
        through ``q_module`` as ``visit`` left it. ``run``'s visit fits and freezes the unit;
        any other visit sees every unit with the ones before it as they were (e.g. RTN)."""
        if getattr(self, "plans", None) is None:
            self._prepare(x)
        t, dev = self.twins, self.twins.device
        scratch = self.rd / CACHE_DIR
        shutil.rmtree(scratch, ignore_errors=True)  # files of a killed run
        self._n = len(x)
        # the activations at the current position, held once: a unit's cache takes them over
        q_h = f_h = MemStore.of(x)
        i = 0
        while i < len(self.units) and self.units[i].segment == "prefix":
            i = self._layer_unit(i, t.qsplit.prefix, t.fsplit.prefix, q_h, f_h, visit)
        q_h, f_h = self._forward(i, t.qsplit.prefix, q_h), self._forward(i, t.fsplit.prefix, f_h)
        qblocks, fblocks = [b for _, b in t.qsplit.blocks], [b for _, b in t.fsplit.blocks]
        while i < len(self.units) and self.units[i].segment == "blocks":
            u = self.units[i]
            if u.layer is None:  # a pack: its FP output is the cache target and the next FP input
                chain_q, chain_f = Chain(*[qblocks[b] for b in u.blocks]), Chain(*[fblocks[b] for b in u.blocks])
                if self.plans[i].mode == "recompute":
                    f_out = None
                    visit(i, chain_q, chain_f,
                          lambda: ActivationCache(q_h, f_h, fp_fn=lambda s: (s, chain_f(s)), device=dev))
                else:
                    f_out = self._forward(i, chain_f, f_h)
                    visit(i, chain_q, chain_f, lambda: ActivationCache(q_h, f_h, f_out, device=dev))
                i += 1
                f_h = self._forward(i, chain_f, f_h) if f_out is None else self._convert(i, f_out)
                f_out = None
            else:  # the layers of one block, then past the block
                b = u.blocks[0]
                while i < len(self.units) and self.units[i].segment == "blocks" and self.units[i].blocks == [b]:
                    i = self._layer_unit(i, qblocks[b], fblocks[b], q_h, f_h, visit)
                chain_q = qblocks[b]
                f_h = self._forward(i, fblocks[b], f_h)
            q_h = self._forward(i, chain_q, q_h)
        while i < len(self.units):
            i = self._layer_unit(i, t.qsplit.suffix, t.fsplit.suffix, q_h, f_h, visit)
        del q_h, f_h
        shutil.rmtree(scratch, ignore_errors=True)

    # -- activation caches ----------------------------------------------------------------------
    @torch.no_grad()
    def plan_cache(self, x: torch.Tensor) -> List[CachePlan]:
        """Each unit's cache size (from one sample's activations) and mode, printed; a unit that
        fits ``recon.cache_budget`` in no allowed mode is a ConfigError, raised before any cache
        is built."""
        t, dev, n = self.twins, self.twins.device, len(x)
        numel = {}

        def hook(m, i, o):
            numel.setdefault(id(m), (i[0][0].numel(), o[0].numel()))

        layers = {u.layer: t.pair(u.layer)[1] for u in self.units if u.layer is not None}
        hs = [m.register_forward_hook(hook) for m in layers.values()]
        try:
            h = t.fsplit.prefix(x[:1].to(dev))
            ends = [h[0].numel()]  # elements per sample at each block boundary
            for _, blk in t.fsplit.blocks:
                h = blk(h)
                ends.append(h[0].numel())
            t.fsplit.suffix(h)
        finally:
            for hk in hs:
                hk.remove()
        plans = []
        for u in self.units:
            if u.layer is None:
                s_in, s_out = ends[u.blocks[0]], ends[u.blocks[-1] + 1]
                plans.append(CachePlan(u.key, n, s_in, s_in, s_out, s_in))
                continue
            s_in, s_out = numel[id(layers[u.layer])]
            src = x[0].numel() if u.segment == "prefix" else ends[u.blocks[0]] if u.segment == "blocks" else ends[-1]
            plans.append(CachePlan(u.key, n, s_in, s_in, s_out, src))
        budget = parse_bytes(self.cfg.cache_budget)
        choose_modes(plans, self.cfg.cache_mode, budget, self.cfg.batch_size,
                     shutil.disk_usage(self.rd.path).free, device_free_bytes(dev))
        log.info("\n".join([f"recon cache: recon.cache_mode={self.cfg.cache_mode}, recon.cache_budget="
                            f"{'null' if budget is None else human(budget)}; per unit (mode, memory):",
                            *plan_table(plans, self.cfg.batch_size)]))
        return plans

    def _announce(self, x: torch.Tensor) -> Dict[str, "cost.UnitCost"]:
        """Predict the units that have no ``unit_XX.pt`` yet (``packptq.recon.cost``), log the
        prediction and send it to the metrics logger (``recon/<unit>/predicted_s``)."""
        todo = [u for i, u in enumerate(self.units) if not self.rd.has(f"unit_{i:02d}.pt")]
        if not todo:
            return {}
        t0 = time.perf_counter()
        costs = cost.predict_costs(self.twins, todo, [unit_iters(u, self.cfg) for u in todo], x, self.cfg,
                                   self.ctx.trainer_kw)
        log.info("%s", cost.describe(costs, time.perf_counter() - t0))
        self.ctx.log_metrics({f"recon/{k}/predicted_s": c.seconds for k, c in costs.items()})
        return costs

    def _maker(self, i: int) -> MakeStore:
        """Empty stores of the calibration set's length in the mode of unit ``i`` (``keep``
        after the last unit)."""
        p = self.plans[i] if i < len(self.plans) else None
        return store_maker(p.mode if p else "keep", self._n, self.twins.device, bool(p and p.on_device),
                           self.rd / CACHE_DIR)

    def _forward(self, i: int, fn, src):
        """``fn`` over the store ``src``, into a store in the mode of unit ``i``."""
        return forward_into(fn, src, self.ctx.batch_size, self.twins.device, self._maker(i))

    def _convert(self, i: int, store):
        """``store`` in the mode of unit ``i``: itself when it already is, else a copy."""
        p = self.plans[i] if i < len(self.plans) else None
        mode = p.mode if p else "keep"
        if isinstance(store, FileStore):
            same = mode == "disk"
        else:
            same = mode != "disk" and store.t.dtype == (torch.float16 if mode == "half" else torch.float32) and \
                (store.t.device.type != "cpu") == bool(p is not None and p.on_device)
        return store if same else forward_into(lambda h: h, store, self.ctx.batch_size, self.twins.device,
                                               self._maker(i))

    def _layer_unit(self, i: int, q_fn, f_fn, q_h, f_h, visit: Visit) -> int:
        """Fit the layer unit ``i``, whose inputs come from running ``q_fn`` / ``f_fn`` (the
        part holding the layer) on the stores ``q_h`` / ``f_h``; returns the next unit's index."""
        ql, fl = self.twins.pair(self.units[i].layer)
        bs, dev, make = self.ctx.batch_size, self.twins.device, self._maker(i)

        def cache() -> ActivationCache:
            q_in, _ = capture_into(q_fn, q_h, ql, bs, dev, make, outputs=False)
            if self.plans[i].mode == "recompute":
                return ActivationCache(q_in, f_h, fp_fn=lambda s: capture_batch(f_fn, fl, s), device=dev)
            f_in, f_out = capture_into(f_fn, f_h, fl, bs, dev, make)
            return ActivationCache(q_in, f_in, f_out, device=dev)

        visit(i, ql, fl, cache)
        return i + 1

    def _check_unit_file(self, name: str, saved, u: Unit) -> None:
        """A unit file must name this unit, its modules and this run's fingerprint."""
        rd = self.rd
        if not isinstance(saved, dict) or "state" not in saved:
            raise ConfigError(f"{rd / name} records no unit identity (key, modules, run); delete it to recompute")
        if saved.get("key") != u.key or saved.get("names") != u.names:
            raise ConfigError(f"{rd / name} holds unit {saved.get('key')} {saved.get('names')}, not {u.key} "
                              f"{u.names}; the run directory mixes unit files: delete them or use a new one")
        if saved.get("fingerprint") != rd.run_fp:
            rd.check_origin(name, saved.get("fingerprint"))

    def _fit(self, i: int, module: nn.Module, _fp_module: nn.Module,
             make_cache: Callable[[], ActivationCache]) -> None:
        u, rd = self.units[i], self.rd
        name, record = f"unit_{i:02d}.pt", f"unit_{i:02d}.json"
        self._bar.set_postfix_str(f"{u.key} ({i + 1}/{len(self.units)})")
        ucfg = replace(self.cfg, iters=unit_iters(u, self.cfg))
        if self.cfg.drop_units == "packs" and u.layer is not None:  # no QDrop outside the packs
            ucfg = replace(ucfg, drop_prob=1.0)
        done = self._bar.n
        if rd.has(name):
            saved = rd.load_pt(name)
            self._check_unit_file(name, saved, u)
            load_unit_state(module, saved["state"])
            if rd.has(record):
                rec = rd.read_json(record)
                if rec.get("key") != u.key or rec.get("names") != u.names:
                    raise ConfigError(f"{rd / record} belongs to unit {rec.get('key')} {rec.get('names')}, not "
                                      f"{u.key} {u.names}; the run directory mixes two runs: use a new one")
                self.losses[u.key] = rec.get("loss", [])
        else:
            t0 = time.perf_counter()
            cache = make_cache()
            t1 = time.perf_counter()
            ls = reconstruct_unit(module, cache, ucfg, UnitRun(
                u.key, self.ctx.seed * 1000 + i, channel_dim(module), self.ctx.trainer_kw, self.ctx.logger,
                self._step_offset, self._bar if self.ctx.progress else None))
            secs = time.perf_counter() - t1
            del cache
            module.to(self.twins.device)
            timing = {"seconds": round(secs, 3), "cache_seconds": round(t1 - t0, 3),
                      **cost.as_record(self._costs.get(u.key))}
            # every step's loss: results.json of a resumed run reports them as a fresh run does.
            # Written before unit_XX.pt, which marks the unit done: a run killed between the two
            # refits the unit instead of resuming without its losses.
            rd.write_json(record, {"key": u.key, "names": u.names, "loss": ls, **timing})
            rd.save_pt(name, {"key": u.key, "names": u.names, "fingerprint": rd.run_fp, "state": unit_state(module, self.cfg.eval_rounding == "soft")})
            self.losses[u.key] = ls
        self._step_offset += ucfg.iters
        self._bar.update(done + ucfg.iters - self._bar.n)  # a loaded unit, or one stopped early
