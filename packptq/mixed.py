"""Pack-wise mixed precision, the pipeline side (DESIGN.md §1, "Pack-wise mixed precision").

``packptq.precision`` decides bit-widths from plain numbers; this module measures those numbers
on the model and applies the decision:

- ``plan(mp_section, qcfg)`` -> ``MixedPrecision``: the validated ``mp`` config (before any
  compute; called by the pipeline when ``mp.policy != none``).
- ``MixedPrecision.check_feasible(model, split)``: the budget against per-block weight counts of
  the unquantized model, before FP training. An impossible ``mp.avg_bits`` stops here with a
  ConfigError that names the feasible range.
- ``MixedPrecision.allocate(...)``: sensitivity per (pack, bits) (measured KL or omega), the
  allocation, the bits set on every QuantLayer, ``bits.json`` and ``sensitivity.json``.

Decisions, stated once:
- Prefix (stem) and suffix (head): every QuantLayer outside the blocks takes ``mp.prefix_bits``
  / ``mp.suffix_bits``. When those are null and ``quant.first_last_bits`` is set, they default to
  it (for ResNet and ViT/DeiT the prefix and suffix are exactly the first and last layer, so an
  MP run keeps them where a uniform run with the same quant config does); otherwise to
  precision.py's default (the target, or the high candidate for ``official``). Their bits count
  against the budget either way.
- Activations: ``mp.acts=follow`` moves the activation quantizers of a pack (the QuantLayers'
  and those of quantized attention inside its blocks) with its weight bits
  (``precision.act_bits``); prefix and suffix layers follow their bits the same way.
  ``mp.acts=fixed`` leaves every activation quantizer where the quant config put it.
- ``omega`` of a pack is the sum of its blocks' ``omega_b`` (the second-order loss of blocks
  quantized together adds up, cross terms neglected).
- ``packing=none`` has no packs; mixed precision then allocates per block.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from packptq import precision
from packptq.config import ConfigError, typed
from packptq.precision import MPConfig
from packptq.quant import ActQuantizer, QuantConfig, QuantLayer, WeightQuantizer, quant_layers

#: the layer types ``quantize_model`` turns into QuantLayers (tests check the counts agree)
QUANTIZED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
SENSITIVITY_FILE = "sensitivity.json"
BITS_FILE = "bits.json"


def plan(section: Any, qcfg: QuantConfig) -> "MixedPrecision":
    """The ``mp`` config section (DictConfig or dict) typed and resolved against ``qcfg``.

    Raises ConfigError for a malformed section. An ``mp.avg_bits`` outside 2..8 is kept for
    ``check_feasible``, so that its error can name the feasible range of the actual model."""
    raw = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    avg = raw.get("avg_bits")
    out_of_range = (raw.get("policy") == "budget" and isinstance(avg, (int, float)) and not isinstance(avg, bool)
                    and math.isfinite(avg) and not precision.MIN_BITS <= avg <= precision.MAX_BITS)
    if out_of_range:
        raw["avg_bits"] = None
    cfg = typed(MPConfig, raw, "mp")
    if out_of_range:
        cfg.avg_bits = float(avg)  # no allocation reaches it; check_feasible says what does
    return MixedPrecision(cfg, qcfg)


def weight_counts(model: nn.Module, split) -> Tuple[List[int], int, int]:
    """(weights per block, prefix weights, suffix weights) of the layers that ``quantize_model``
    will quantize, counted on the unquantized ``model`` and its ``split``."""

    def count(modules: Sequence[nn.Module]) -> int:
        seen = {id(m): m for top in modules for m in top.modules() if isinstance(m, QUANTIZED_TYPES)}
        return sum(int(m.weight.numel()) for m in seen.values())

    blocks = [count([b]) for _, b in split.blocks]
    return (blocks, count([m for _, m in split.prefix.submodules()]),
            count([m for _, m in split.suffix.submodules()]))


def set_group_bits(modules: Sequence[nn.Module], w_bits: int, a_bits: Optional[int]) -> None:
    """Set every QuantLayer inside ``modules`` to ``w_bits`` (weight ranges re-initialised by the
    MSE search) and, unless ``a_bits`` is None, every activation quantizer inside them (the
    QuantLayers' and quantized attention's) to ``a_bits`` (re-initialised from the calibration
    samples they kept)."""
    layers = {id(m): m for top in modules for m in top.modules() if isinstance(m, QuantLayer)}
    for m in layers.values():
        m.set_bits(w_bits, a_bits)
    if a_bits is None:
        return
    own = {id(m.aq) for m in layers.values()}
    for top in modules:
        for m in top.modules():
            if isinstance(m, ActQuantizer) and id(m) not in own:
                m.set_bits(a_bits)


def _snapshot(modules: Sequence[nn.Module]) -> List[Tuple[nn.Module, dict, list]]:
    """What ``set_group_bits`` changes in ``modules``: quantizer bits, modes, kept calibration
    samples and tensors. ``_restore`` puts it back exactly (no second range search)."""
    out = []
    for top in modules:
        attrs = []
        for m in top.modules():
            if isinstance(m, WeightQuantizer):
                attrs.append((m, {"bits": m.bits, "mode": m.mode, "alpha": m.alpha}))
            elif isinstance(m, ActQuantizer):
                attrs.append((m.q, {"bits": m.q.bits}))
                attrs.append((m, {"_samples": list(m._samples)}))
        state = {k: v.detach().clone() for k, v in top.state_dict().items()}
        out.append((top, state, attrs))
    return out


def _restore(snap) -> None:
    for top, state, attrs in snap:
        for m, values in attrs:
            for k, v in values.items():
                setattr(m, k, v)
        top.load_state_dict(state)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    from packptq.packing import _kl as kl  # one KL for scores and sensitivities

    return kl(p_logits, q_logits)


@torch.no_grad()
def kl_sensitivity(qsplit, fsplit, packs: Sequence[Sequence[int]], candidates: Sequence[int],
                   x: torch.Tensor, device: torch.device, act_bits_of=None, batch_size: int = 128,
                   progress: bool = False) -> np.ndarray:
    """Measured sensitivity [n_packs, n_candidates]: mean over ``x`` [n, ...] of
    KL(softmax(FP logits) || softmax(logits with only pack j at bits b)), in nats.

    Pack j runs from its cached FP input with its quantizers at b bits (weights re-initialised by
    the MSE search, activations at ``act_bits_of(b)`` re-initialised from their calibration
    samples; ``act_bits_of`` None or returning None leaves activations alone); every other part is
    the FP model. The pack's quantizers are restored afterwards."""
    from packptq.pipeline import forward_all

    q_blocks = [m for _, m in qsplit.blocks]
    f_blocks = [m for _, m in fsplit.blocks]
    fp_logits = forward_all(fsplit.forward, x, batch_size, device)
    h = forward_all(fsplit.prefix, x, batch_size, device)  # FP input of the current pack
    table = np.zeros((len(packs), len(candidates)), dtype=np.float64)
    bar = tqdm(list(enumerate(packs)), desc="sensitivity", disable=not progress, leave=False)
    for j, pack in bar:
        mods = [q_blocks[b] for b in pack]
        rest = f_blocks[pack[-1] + 1:]

        def run(z: torch.Tensor) -> torch.Tensor:
            for m in mods:
                z = m(z)
            for m in rest:
                z = m(z)
            return fsplit.suffix(z)

        snap = _snapshot(mods)
        try:
            for k, b in enumerate(candidates):
                set_group_bits(mods, b, act_bits_of(b) if act_bits_of is not None else None)
                total = 0.0
                for i in range(0, len(h), batch_size):
                    q = run(h[i:i + batch_size].to(device))
                    total += float(_kl(fp_logits[i:i + batch_size].to(device), q).sum())
                table[j, k] = total / len(h)
        finally:
            _restore(snap)
        for b in pack:
            h = forward_all(f_blocks[b], h, batch_size, device)
    return table


class MixedPrecision:
    """The pipeline's mixed-precision plan (see the module docstring for the conventions).

    cfg: the typed ``mp`` section with prefix/suffix bits resolved; w_bits / a_bits: the target
    bit-widths (``quant.w_bits`` / ``quant.a_bits``)."""

    def __init__(self, cfg: MPConfig, qcfg: QuantConfig) -> None:
        fl = qcfg.first_last_bits
        if fl is not None:
            avg = cfg.avg_bits  # may be a deferred out-of-range value (see ``plan``)
            cfg = dataclasses.replace(cfg, avg_bits=None,
                                      prefix_bits=cfg.prefix_bits if cfg.prefix_bits is not None else fl,
                                      suffix_bits=cfg.suffix_bits if cfg.suffix_bits is not None else fl)
            cfg.avg_bits = avg
        self.cfg = cfg
        self.w_bits, self.a_bits = int(qcfg.w_bits), int(qcfg.a_bits)
        self.candidates = precision.resolve_candidates(cfg, self.w_bits)  # ConfigError early
        self.prefix_bits, self.suffix_bits = precision.boundary_bits(cfg, self.w_bits)
        self.allocation: Optional[precision.Allocation] = None
        self.act_bits: Optional[List[int]] = None
        self.feasible: Optional[Tuple[float, float]] = None

    @property
    def needs_omega(self) -> bool:
        """Whether the pipeline must compute block scores (omega) before ``allocate``."""
        return self.cfg.policy == "official" or self.cfg.sensitivity == "omega"

    def _acts(self, w: int) -> Optional[int]:
        """Activation bits for weight bits ``w`` (None: leave activations alone)."""
        if self.cfg.acts == "fixed":
            return None
        return precision.act_bits(self.cfg, self.w_bits, self.a_bits, [w])[0]

    # -- before FP training -----------------------------------------------------------------
    def check_feasible(self, model: nn.Module, split) -> Tuple[float, float]:
        """Raise ConfigError when ``mp.avg_bits`` is outside the reachable range of ``model``
        (the unquantized model and its ``split``); return that range (bits per weight)."""
        blocks, pre, suf = weight_counts(model, split)
        self.feasible = precision.feasible_range(self.cfg, self.w_bits, blocks, pre, suf)
        precision.check_feasible(self.cfg, self.w_bits, blocks, pre, suf)
        lo, hi = self.feasible
        print(f"[packptq] mp={self.cfg.policy}: candidates {list(self.candidates)}, prefix/suffix at "
              f"{self.prefix_bits}/{self.suffix_bits} bits, reachable average [{lo:.4f}, {hi:.4f}] "
              f"bits per weight" + (f", budget {self.target_avg_bits:g}" if self.target_avg_bits else ""))
        return self.feasible

    @property
    def target_avg_bits(self) -> Optional[float]:
        """The budget in bits per weight: ``mp.avg_bits`` (default the target weight bits) for
        ``budget``, (mid + high) / 2 for ``official``, None for ``none``."""
        if self.cfg.policy == "budget":
            return float(self.cfg.avg_bits) if self.cfg.avg_bits is not None else float(self.w_bits)
        if self.cfg.policy == "official":
            return (self.candidates[0] + self.candidates[-1]) / 2
        return None

    # -- the bits phase -----------------------------------------------------------------------
    def allocate(self, rd, qmodel: nn.Module, qsplit, fsplit, packs: List[List[int]], scores: Optional[dict],
                 x_cal: torch.Tensor, device: torch.device, block_layers: List[List[str]],
                 prefix_layers: List[str], suffix_layers: List[str], progress: bool = False) -> List[int]:
        """Choose and apply the bits of every pack; returns the per-pack weight bits.

        Sets every QuantLayer (packs, prefix, suffix) via ``QuantLayer.set_bits``; writes
        ``sensitivity.json`` (the cost table, reused on resume) and ``bits.json``."""
        groups = [list(p) for p in packs] or [[b] for b in range(len(qsplit.blocks))]
        names = qsplit.block_names
        pack_names = [[names[b] for b in p] for p in groups]
        numel = {n: int(m.layer.weight.numel()) for n, m in quant_layers(qmodel)}
        sizes = [sum(numel[n] for b in p for n in block_layers[b]) for p in groups]
        pre_w = sum(numel[n] for n in prefix_layers)
        suf_w = sum(numel[n] for n in suffix_layers)
        omega = None
        if scores is not None and scores.get("omega") is not None:
            omega = [float(sum(scores["omega"][b] for b in p)) for p in groups]
        cost = None
        if self.cfg.policy == "budget" and self.cfg.sensitivity == "kl":
            cost = self._kl_table(rd, qsplit, fsplit, groups, pack_names, x_cal, device, progress)
        if self.needs_omega and omega is None:
            raise RuntimeError("mixed precision needs omega but the pipeline gave no scores")
        if self.cfg.policy == "budget" and self.cfg.sensitivity == "omega":
            rd.write_json(SENSITIVITY_FILE, self._table_record(
                "omega", pack_names, precision.omega_costs(omega, self.candidates, self.w_bits)))
        if cost is not None:  # precision reads cost[pack][bits]
            cost = [dict(zip(self.candidates, map(float, row))) for row in cost]
        alloc = precision.allocate(self.cfg, self.w_bits, sizes, cost=cost, omega=omega,
                                   prefix_weights=pre_w, suffix_weights=suf_w)
        acts = precision.act_bits(self.cfg, self.w_bits, self.a_bits, alloc.bits)
        q_blocks = [m for _, m in qsplit.blocks]
        for p, w in zip(groups, alloc.bits):
            set_group_bits([q_blocks[b] for b in p], w, self._acts(w))
        for layer_names, w in ((prefix_layers, alloc.prefix_bits), (suffix_layers, alloc.suffix_bits)):
            set_group_bits([qmodel.get_submodule(n) for n in layer_names], w, self._acts(w))
        rd.write_json(BITS_FILE, precision.bits_json(pack_names, alloc, acts))
        self.allocation, self.act_bits = alloc, acts
        print(f"[packptq] {alloc.describe()}")
        n_all = sum(numel.values())
        if n_all != alloc.n_weights:
            print(f"[packptq] warning: {n_all - alloc.n_weights} quantized weights are outside the prefix, "
                  "blocks and suffix (never executed?); the reported average counts them, bits.json does not")
        return list(alloc.bits)

    def _table_record(self, kind: str, pack_names, table: np.ndarray) -> dict:
        return {"kind": kind, "acts": self.cfg.acts, "candidates": list(self.candidates),
                "packs": pack_names, "table": np.asarray(table).tolist(),
                "unit": "nats (mean KL of the output)" if kind == "kl" else "omega * 4**(target - bits)"}

    def _kl_table(self, rd, qsplit, fsplit, groups, pack_names, x_cal, device, progress) -> np.ndarray:
        if rd.has(SENSITIVITY_FILE):
            rec = rd.read_json(SENSITIVITY_FILE)
            want = self._table_record("kl", pack_names, np.zeros((0,)))
            if all(rec.get(k) == want[k] for k in ("kind", "acts", "candidates", "packs")):
                return np.asarray(rec["table"], dtype=np.float64)
        table = kl_sensitivity(qsplit, fsplit, groups, self.candidates, x_cal, device,
                               act_bits_of=self._acts, progress=progress)
        rd.write_json(SENSITIVITY_FILE, self._table_record("kl", pack_names, table))
        return table

    def describe(self) -> Dict[str, Any]:
        """JSON-ready summary for results.json (``mp``): the config, the budget and what the
        allocation achieved."""
        a = self.allocation
        return {
            "policy": self.cfg.policy,
            "avg_bits": self.target_avg_bits,  # the budget the allocation was held to
            "target_w_bits": self.w_bits,
            "target_a_bits": self.a_bits,
            "achieved_w_bits": None if a is None else a.avg_bits,
            "candidates": list(self.candidates),
            "sensitivity": "omega" if self.cfg.policy == "official" else self.cfg.sensitivity,
            "acts": self.cfg.acts,
            "solver": None if a is None else (a.solver or self.cfg.policy),
            "prefix_bits": self.prefix_bits,
            "suffix_bits": self.suffix_bits,
            "feasible_range": None if self.feasible is None else list(self.feasible),
            "cost": None if a is None else a.cost,
            "bits": None if a is None else list(a.bits),
            "a_bits": self.act_bits,
        }
