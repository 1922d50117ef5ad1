"""Pack-wise mixed precision, the pipeline side: measure the numbers an allocator needs on the
model, allocate, and apply the decision.

- ``plan(mp_section, qcfg)``: the ``mp`` section typed (always, before any compute) and, unless
  the policy leaves the quant config's bits alone (``none``), a ``MixedPrecision``.
- ``MixedPrecision.check_feasible(model, split)``: the budget against the weight counts of the
  unquantized model, before FP training. An impossible ``mp.avg_bits`` stops here with a
  ConfigError that names the feasible range.
- ``MixedPrecision.allocate(...)``: sensitivity per (pack, bits) (measured KL or omega), the
  allocation, the bits set on every QuantLayer, ``bits.json`` and ``sensitivity.json``.

Conventions:
- Prefix (stem) and suffix (head): the first layer of the prefix and the last of the suffix
  take the bits ``boundary_bits`` resolves: ``mp.prefix_bits`` / ``mp.suffix_bits``, else
  ``quant.first_last_bits`` when set, else the policy's default; any other layer outside the
  blocks (MobileNetV2's conv_head) stays at the target bits. An MP run thus keeps them where a
  uniform run with the same quant config does. The official rule (``boundary = "units"``) puts
  every prefix and suffix layer at its high bits instead. All of them count against the budget.
- Activations: ``mp.acts=follow`` moves the activation quantizers of a pack (the QuantLayers'
  and those of quantized attention inside its blocks) with its weight bits (``act_bits``);
  prefix and suffix layers follow their bits the same way. ``mp.acts=fixed`` leaves every
  activation quantizer where the quant config put it.
- ``omega`` of a pack is the sum of its blocks' ``omega_b`` (the second-order loss of blocks
  quantized together adds up, cross terms neglected).
- ``packing=none`` has no packs; mixed precision then allocates per block.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from packptq.config import ConfigError, typed
from packptq.mp import sensitivity
from packptq.mp.accounting import (act_count, bit_accounting, bits_json, quantized_layers, weight_count,
                                   weight_counts)
from packptq.mp.allocators import Allocation, allocate, check_feasible, omega_costs, uniform_budget
from packptq.mp.config import (ALLOCATORS, BITS_FILE, SENSITIVITY_FILE, MPConfig, act_bits, boundary_bits,
                               resolve_candidates)
from packptq.quant import QuantConfig

log = logging.getLogger("packptq")


def plan(section: Any, qcfg: QuantConfig) -> Optional["MixedPrecision"]:
    """The ``mp`` config section (DictConfig, dict or None) typed and resolved against ``qcfg``;
    None when the policy keeps every layer at the quant config's bits (``mp.policy=none``).

    Raises ConfigError for a malformed section, and for ``mp.prefix_bits``/``suffix_bits`` set
    with such a policy (they would do nothing). Whether ``mp.avg_bits`` is reachable is left to
    ``MixedPrecision.check_feasible``, whose error names the feasible range of the model."""
    cfg = typed(MPConfig, section, "mp")
    if not cfg.allocator.sets_bits:
        if cfg.prefix_bits is not None or cfg.suffix_bits is not None:
            others = "|".join(n for n, a in ALLOCATORS.items() if a.sets_bits)
            raise ConfigError(f"mp.prefix_bits/suffix_bits do nothing with mp.policy={cfg.policy} (the quant "
                              f"config sets every layer's bits); set them to null or choose mp={others}")
        return None
    return MixedPrecision(cfg, qcfg)


class MixedPrecision:
    """The pipeline's mixed-precision plan (see the module docstring for the conventions).

    cfg: the typed ``mp`` section with prefix/suffix bits resolved (``boundary_bits``);
    w_bits / a_bits: the target bit-widths (``quant.w_bits`` / ``quant.a_bits``)."""

    def __init__(self, cfg: MPConfig, qcfg: QuantConfig) -> None:
        self.allocator = cfg.allocator
        self.w_bits, self.a_bits = int(qcfg.w_bits), int(qcfg.a_bits)
        self.candidates = resolve_candidates(cfg, self.w_bits)  # ConfigError early
        self.prefix_bits, self.suffix_bits = boundary_bits(cfg, self.w_bits, qcfg.first_last_bits)
        self.cfg = dataclasses.replace(cfg, prefix_bits=self.prefix_bits, suffix_bits=self.suffix_bits)
        self.allocation: Optional[Allocation] = None
        self.act_bits: Optional[List[int]] = None
        self.feasible: Optional[Tuple[float, float]] = None

    def check_score_loss(self, loss: str) -> None:
        """ConfigError when the rule insists on the omega of another block score than ``loss``
        (``packing.loss``), before any compute."""
        want = self.allocator.score_loss
        if want is not None and loss != want:
            raise ConfigError(f"mp.policy={self.cfg.policy} ranks packs by the omega of the {want} block score; "
                              f"set packing.loss={want}")

    @property
    def needs_omega(self) -> bool:
        """Whether the pipeline must compute block scores (omega) before ``allocate``."""
        return self.allocator.needs_omega(self.cfg)

    @property
    def target_avg_bits(self) -> Optional[float]:
        """The budget in bits per weight: ``mp.avg_bits`` (default the target weight bits) for
        ``budget``, (mid + high) / 2 for ``official``."""
        return self.allocator.budget_avg_bits(self.cfg, self.candidates, self.w_bits)

    def _acts(self, w: int) -> Optional[int]:
        """Activation bits for weight bits ``w`` (None: leave activations alone)."""
        if self.cfg.acts == "fixed":
            return None
        return act_bits(self.cfg, self.w_bits, self.a_bits, [w])[0]

    # -- before FP training -----------------------------------------------------------------
    def check_feasible(self, model: nn.Module, split) -> Tuple[float, float]:
        """Raise ConfigError when ``mp.avg_bits`` is outside the reachable range of ``model``
        (the unquantized model and its ``split``); return that range (bits per weight)."""
        blocks, _, _ = weight_counts(split)
        pre, suf, rest = (weight_count(g) for g in self._boundary([m for _, m in split.prefix.submodules()],
                                                                   [m for _, m in split.suffix.submodules()]))
        self.feasible = check_feasible(self.cfg, self.w_bits, blocks, pre, suf, rest)
        lo, hi = self.feasible
        log.info(f"mp={self.cfg.policy}: candidates {list(self.candidates)}, prefix/suffix at "
                 f"{self.prefix_bits}/{self.suffix_bits} bits, reachable average [{lo:.4f}, {hi:.4f}] "
                 f"bits per weight" + (", budget the uniform model's average" if uniform_budget(self.cfg) else
                                       f", budget {self.target_avg_bits:g}" if self.target_avg_bits else ""))
        return self.feasible

    # -- the bits phase -----------------------------------------------------------------------
    def allocate(self, ctx, twins, packs: List[List[int]], block_omega: Optional[List[float]],
                 x_cal: torch.Tensor) -> List[int]:
        """Choose and apply the bits of every pack; returns the per-pack weight bits.

        ctx: the run's ``context.RunContext`` (run directory, progress); ``block_omega``: omega_b
        per block (the score phase's), None without scores.
        twins: the quantized model and its FP reference, with attributes ``qmodel``, ``qsplit``,
        ``fsplit``, ``device`` and the QuantLayer names ``prefix_layers``, ``block_layers`` (per
        block) and ``suffix_layers``. Sets every QuantLayer (packs, prefix, suffix) via
        ``QuantLayer.set_bits``; writes ``sensitivity.json`` (the cost table, reused on resume)
        and ``bits.json``."""
        qmodel, qsplit = twins.qmodel, twins.qsplit
        groups = [list(p) for p in packs] or [[b] for b in range(len(qsplit.blocks))]
        names = qsplit.block_names
        pack_names = [[names[b] for b in p] for p in groups]
        layers = qmodel.get_submodule
        sizes = [weight_count([layers(n) for b in p for n in twins.block_layers[b]]) for p in groups]
        edge_pre, edge_suf, rest = self._boundary([layers(n) for n in twins.prefix_layers],
                                                  [layers(n) for n in twins.suffix_layers])
        pre_w, suf_w = weight_count(edge_pre), weight_count(edge_suf)
        omega = None
        if block_omega is not None:
            reduce = (lambda v: sum(v) / len(v)) if self.allocator.pack_omega == "mean" else sum
            omega = [float(reduce([block_omega[b] for b in p])) for p in groups]
        q_blocks = [m for _, m in qsplit.blocks]
        acts = ([act_count([q_blocks[b] for b in p]) for p in groups], act_count(edge_pre), act_count(edge_suf))
        source = self.allocator.cost_source(self.cfg)
        cost = None
        if source == "kl":
            cost = self._kl_table(ctx.rd, twins, groups, pack_names, x_cal, ctx.progress)
        if self.needs_omega and omega is None:
            raise RuntimeError("mixed precision needs omega but the pipeline gave no scores")
        if source == "omega":
            ctx.rd.write_json(SENSITIVITY_FILE, self._table_record(
                "omega", pack_names, omega_costs(omega, self.candidates, self.w_bits)))
        if cost is not None:  # allocate reads cost[pack][bits]
            cost = [dict(zip(self.candidates, map(float, row))) for row in cost]
        alloc = allocate(self.cfg, self.w_bits, sizes, cost=cost, omega=omega,
                         prefix_weights=pre_w, suffix_weights=suf_w, acts=acts, a_target=self.a_bits,
                         rest=(weight_count(rest), act_count(rest)))
        acts = act_bits(self.cfg, self.w_bits, self.a_bits, alloc.bits)
        for p, w in zip(groups, alloc.bits):
            sensitivity.set_group_bits([q_blocks[b] for b in p], w, self._acts(w))
        for group, w in ((edge_pre, alloc.prefix_bits), (edge_suf, alloc.suffix_bits), (rest, self.w_bits)):
            sensitivity.set_group_bits(group, w, self._acts(w))
        ctx.rd.record(BITS_FILE, bits_json(pack_names, alloc, acts))
        self.allocation, self.act_bits = alloc, acts
        log.info("%s", alloc.describe())
        outside = weight_count([qmodel]) - alloc.n_weights
        if outside:
            log.warning("%d quantized weights are outside the prefix, blocks and suffix (never executed?); the "
                        "reported average counts them, bits.json does not", outside)
        return list(alloc.bits)

    def _boundary(self, prefix: List[nn.Module], suffix: List[nn.Module]):
        """(layers at the prefix bits, layers at the suffix bits, layers at the target bits) of the
        modules outside the blocks under the allocator's ``boundary``: ``edges`` takes the first
        prefix layer and the last suffix layer in the order given (execution order for the
        quantized model's ``Twins`` lists, module order for the unquantized split)."""
        if self.allocator.boundary == "units":
            return prefix, suffix, []
        pre, suf = quantized_layers(prefix), quantized_layers(suffix)
        return pre[:1], suf[-1:], pre[1:] + suf[:-1]

    def _table_record(self, kind: str, pack_names, table: np.ndarray) -> dict:
        return {"kind": kind, "acts": self.cfg.acts, "candidates": list(self.candidates),
                "packs": pack_names, "table": np.asarray(table).tolist(),
                "unit": "nats (mean KL of the output)" if kind == "kl" else "omega * 4**(target - bits)"}

    def _kl_table(self, rd, twins, groups, pack_names, x_cal, progress) -> np.ndarray:
        if rd.has(SENSITIVITY_FILE):
            rec = rd.read_json(SENSITIVITY_FILE)
            want = self._table_record("kl", pack_names, np.zeros((0,)))
            if all(rec.get(k) == want[k] for k in ("kind", "acts", "candidates", "packs")):
                return np.asarray(rec["table"], dtype=np.float64)
        table = sensitivity.kl_sensitivity(twins.qsplit, twins.fsplit, groups, self.candidates, x_cal,
                                           twins.device, act_bits_of=self._acts, progress=progress)
        rd.write_json(SENSITIVITY_FILE, self._table_record("kl", pack_names, table))
        return table

    def describe(self) -> Dict[str, Any]:
        """JSON-ready summary for results.json (``mp``): the config, the budget and what the
        allocation achieved."""
        a = self.allocation
        return {
            "policy": self.cfg.policy,
            # the budget the allocation was held to
            "avg_bits": self.target_avg_bits if a is None or a.budget_avg_bits is None else a.budget_avg_bits,
            "budget": self.cfg.budget,
            "target_w_bits": self.w_bits,
            "target_a_bits": self.a_bits,
            "achieved_w_bits": None if a is None else a.avg_bits,
            "a_avg_bits": None if a is None else a.a_budget_avg_bits,  # the activation budget, if any
            "achieved_a_bits": None if a is None else a.a_avg_bits,
            "candidates": list(self.candidates),
            "sensitivity": self.cfg.sensitivity,
            "acts": self.cfg.acts,
            "solver": None if a is None else (a.solver or self.cfg.policy),
            "prefix_bits": self.prefix_bits,
            "suffix_bits": self.suffix_bits,
            "feasible_range": None if self.feasible is None else list(self.feasible),
            "cost": None if a is None else a.cost,
            "bits": None if a is None else list(a.bits),
            "a_bits": self.act_bits,
        }


@dataclass(frozen=True)
class Bits:
    """The bits phase's output: weight bits per pack (None without mixed precision) and the bit
    accounting of the quantized model (``bit_accounting``)."""

    pack_bits: Optional[List[int]]
    acct: Dict[str, Any]


def run(ctx, plan_: Optional[MixedPrecision], twins, packs: List[List[int]], block_omega: Optional[List[float]],
        x_cal: torch.Tensor) -> Bits:
    """The bits phase (``ctx``: the run's ``context.RunContext``): with a plan, allocate and set
    the bits of every pack (``MixedPrecision.allocate``); in every case, the bit accounting."""
    with ctx.phase("bits"):
        pack_bits = None
        if plan_ is not None:
            pack_bits = plan_.allocate(ctx, twins, packs, block_omega, x_cal)
            desc, names = plan_.describe(), twins.block_names
            ctx.log_metrics({"mp/achieved_w_bits": desc["achieved_w_bits"], "mp/budget_avg_bits": desc["avg_bits"]})
            ctx.log_table("mp/bits", ["pack", "blocks", "w_bits", "a_bits"],
                          [[j, " ".join(names[b] for b in p), w, a] for j, (p, w, a)
                           in enumerate(zip(packs or [[b] for b in range(len(names))], pack_bits, desc["a_bits"]))])
        acct = bit_accounting(twins.qmodel)
        a = acct["a_bits_avg"]
        log.info(f"bits: average weight {acct['w_bits_avg']:.4f}, activation {a if a is None else round(a, 4)}, "
                 f"size {acct['size_bytes']} bytes over {acct['n_weights']} weights")
    return Bits(pack_bits, acct)
