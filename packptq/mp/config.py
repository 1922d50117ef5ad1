"""The ``mp`` config section, typed once, and the allocator interface it is validated against.

``MPConfig`` checks each field on its own (known names, bit-widths in 2..8, ``avg_bits``
finite) and asks the registered allocator of its ``policy`` which fields that policy reads.
Whether ``avg_bits`` is reachable depends on the model, so it is checked by
``packptq.mp.allocators.check_feasible``, whose error names the feasible range.

The registry ``ALLOCATORS`` lives here so that the config can consult it; its entries are
registered by ``packptq.mp.allocators``, which ``packptq.mp`` always imports. The interface's
data live here too: ``MPProblem`` (what an allocator is given), ``Allocation`` (what it returns)
and ``act_bits`` (the activation bits that go with a pack's weight bits under ``mp.acts``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from packptq.config import ConfigError
from packptq.registry import Registry

MIN_BITS, MAX_BITS = 2, 8
SENSITIVITIES = ("kl", "omega")
ACT_MODES = ("follow", "fixed")
#: what a null mp.avg_bits / mp.a_avg_bits means for mp.policy=budget (MPConfig.budget)
BUDGETS = ("target", "uniform")
SENSITIVITY_FILE = "sensitivity.json"
BITS_FILE = "bits.json"


def check_bits(value: int, what: str) -> None:
    """ConfigError unless ``value`` is an integer bit-width in 2..8."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {value!r}")


class Allocator:
    """One bit-allocation policy: what it reads from ``MPConfig``, its defaults and its rule.

    Class attributes:
    - ``name``: the ``mp.policy`` value.
    - ``reads_avg_bits``: whether ``mp.avg_bits`` is its budget (then the budget is user-given
      and ``check_feasible`` checks it against the model).
    - ``takes_candidates``: whether ``mp.candidates`` means anything to it.
    - ``sensitivity``: the only ``mp.sensitivity`` it accepts (None: any).
    - ``sets_bits``: whether the pipeline applies its allocation (False: every layer keeps the
      quant config's bits and no mixed-precision plan is made).
    - ``boundary``: which layers outside the packs take the prefix/suffix bits: ``edges`` (the
      first layer of the prefix and the last of the suffix, the layers ``quant.first_last_bits``
      pins in a uniform run; the other prefix/suffix layers, e.g. MobileNetV2's conv_head, stay at
      the target bits) or ``units`` (every layer of the prefix and the suffix)."""

    name: str = ""
    #: how a pack's omega comes from its blocks' omega_b: "sum" or "mean"
    pack_omega: str = "sum"
    #: the block score (packing.loss) whose omega the rule reads, when it insists on one
    score_loss: Optional[str] = None
    #: whether quant.first_last_bits sets the prefix/suffix bits (else the policy's default does)
    boundary_from_quant: bool = True
    reads_avg_bits: bool = False
    takes_candidates: bool = True
    sensitivity: Optional[str] = None
    sets_bits: bool = True
    boundary: str = "edges"

    # -- config ---------------------------------------------------------------------------------
    def validate(self, cfg: "MPConfig") -> None:
        """ConfigError for a field this policy does not read or a value it cannot use."""
        if cfg.avg_bits is not None and not self.reads_avg_bits:
            readers = "|".join(n for n, a in ALLOCATORS.items() if a.reads_avg_bits)
            raise ConfigError(
                f"mp.avg_bits is only used by mp.policy={readers} (policy is '{cfg.policy}'); "
                "set mp.avg_bits=null"
            )
        if cfg.candidates is not None and not self.takes_candidates:
            raise ConfigError(f"mp.candidates is unused by mp.policy={cfg.policy}; set it to null")
        if self.sensitivity is not None and cfg.sensitivity != self.sensitivity:
            raise ConfigError(
                f"mp.policy={cfg.policy} ranks packs by {self.sensitivity}; "
                f"set mp.sensitivity={self.sensitivity}"
            )

    def default_candidates(self, target_bits: int) -> Tuple[int, ...]:
        """The ascending candidate bit-widths when ``mp.candidates`` is null."""
        raise NotImplementedError

    def default_boundary_bits(self, candidates: Tuple[int, ...], target_bits: int) -> int:
        """Prefix/suffix weight bits when neither ``mp.prefix_bits``/``suffix_bits`` nor
        ``quant.first_last_bits`` gives them."""
        return target_bits

    def budget_avg_bits(self, cfg: "MPConfig", candidates: Tuple[int, ...],
                        target_bits: int) -> Optional[float]:
        """The budget in bits per weight over all quantized weights (None: no budget)."""
        return None

    def cost_source(self, cfg: "MPConfig") -> Optional[str]:
        """The sensitivity table the rule minimises: ``kl`` (measured), ``omega``
        (``omega_costs``) or None (the rule needs no table)."""
        return None

    def needs_omega(self, cfg: "MPConfig") -> bool:
        """Whether the rule reads one omega score per pack."""
        return self.cost_source(cfg) == "omega"

    # -- the rule -------------------------------------------------------------------------------
    def allocate(self, problem: "MPProblem") -> "Allocation":
        raise NotImplementedError


#: name -> Allocator instance (entries in packptq.mp.allocators)
ALLOCATORS: Registry[Allocator] = Registry("bit allocator")


@dataclass
class MPConfig:
    """The ``mp`` config section (conf/mp/*.yaml).

    policy: ``none`` (every pack at the target), ``budget`` (exact multiple-choice knapsack under
      ``avg_bits``), ``official`` (the official code's greedy rule; a (mid+high)/2-bit model).
    avg_bits: budget in bits per weight over all quantized weights; null = the target weight
      bits. Only ``budget`` reads it. Any finite value is accepted here; whether the model can
      reach it is checked by ``check_feasible``.
    candidates: bit-widths a pack may take; null = [target-1, target, target+1] clipped to 2..8
      (``budget``) or [target, target+1] (``official``, which needs exactly two values).
    sensitivity: what ``budget`` minimises: ``kl`` (a measured cost table per pack and bit-width)
      or ``omega`` (``omega_j * 4**(target - b)``, see ``omega_costs``). ``official`` always
      ranks by omega and requires ``omega``.
    acts: ``follow`` (a pack's activation bits move with its weight bits, see ``act_bits``) or
      ``fixed`` (activations stay at the target activation bits).
    a_avg_bits: with ``budget`` and ``acts=follow``, the budget in bits per activation element
      (per sample, over every quantized activation); null = the target activation bits. The
      allocation then holds weights and activations each to its average.
    budget: what a null ``avg_bits`` / ``a_avg_bits`` means for ``budget``: ``target`` (the target
      weight / activation bits) or ``uniform`` (the averages of the uniform model at the target
      bits, prefix and suffix included: equal weight and activation cost to a uniform run whose
      first and last layer sit at other bits, where the target itself may be unreachable).
    prefix_bits / suffix_bits: weight bits of the prefix (stem) and suffix (head); null =
      ``quant.first_last_bits`` when the pipeline has one, else the target (``none``,
      ``budget``) or the high candidate (``official``); see ``boundary_bits``.
    """

    policy: str = "none"
    avg_bits: Optional[float] = None
    candidates: Optional[List[int]] = None
    sensitivity: str = "kl"
    acts: str = "follow"
    prefix_bits: Optional[int] = None
    suffix_bits: Optional[int] = None
    a_avg_bits: Optional[float] = None
    budget: str = "target"

    def __post_init__(self) -> None:
        if self.policy not in ALLOCATORS:
            raise ConfigError(
                f"mp.policy='{self.policy}' is unknown; known: {', '.join(ALLOCATORS.names())}"
            )
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(
                f"mp.sensitivity='{self.sensitivity}' is unknown; known: {', '.join(SENSITIVITIES)}"
            )
        if self.acts not in ACT_MODES:
            raise ConfigError(f"mp.acts='{self.acts}' is unknown; known: {', '.join(ACT_MODES)}")
        if self.a_avg_bits is not None and not (self.policy == "budget" and self.acts == "follow"):
            raise ConfigError("mp.a_avg_bits is only used by mp.policy=budget with mp.acts=follow; "
                              "set mp.a_avg_bits=null")
        if self.budget not in BUDGETS:
            raise ConfigError(f"mp.budget='{self.budget}' is unknown; known: {', '.join(BUDGETS)}")
        if self.budget != "target" and self.policy != "budget":
            raise ConfigError(f"mp.budget={self.budget} is only read by mp.policy=budget; set mp.budget=target")
        if self.a_avg_bits is not None and not math.isfinite(self.a_avg_bits):
            raise ConfigError(f"mp.a_avg_bits must be a finite number or null, got {self.a_avg_bits}")
        if self.avg_bits is not None and not math.isfinite(self.avg_bits):
            raise ConfigError(f"mp.avg_bits must be a finite number of bits per weight or null, "
                              f"got {self.avg_bits}")
        if self.candidates is not None:
            if len(self.candidates) == 0:
                raise ConfigError("mp.candidates must be null or a non-empty list of bit-widths")
            for b in self.candidates:
                check_bits(b, "every mp.candidates entry")
            if len(set(self.candidates)) != len(self.candidates):
                raise ConfigError(f"mp.candidates has duplicates: {list(self.candidates)}")
        for name in ("prefix_bits", "suffix_bits"):
            value = getattr(self, name)
            if value is not None:
                check_bits(value, f"mp.{name}")
        self.allocator.validate(self)

    @property
    def allocator(self) -> Allocator:
        """The registered allocator of ``policy``."""
        return ALLOCATORS.get(self.policy)


def resolve_candidates(cfg: MPConfig, target_bits: int) -> Tuple[int, ...]:
    """The ascending candidate bit-widths for ``cfg.policy`` at ``target_bits``."""
    check_bits(target_bits, "the target weight bits (quant.w_bits)")
    if cfg.candidates is not None:
        return tuple(sorted(cfg.candidates))
    return cfg.allocator.default_candidates(target_bits)


def boundary_bits(cfg: MPConfig, target_bits: int,
                  first_last_bits: Optional[int] = None) -> Tuple[int, int]:
    """(prefix_bits, suffix_bits): ``mp.prefix_bits``/``suffix_bits`` when set, else
    ``first_last_bits`` (``quant.first_last_bits``) when given and the policy takes it, else the
    policy's default (the high candidate for ``official``, the target otherwise)."""
    if first_last_bits is not None and cfg.allocator.boundary_from_quant:
        default = int(first_last_bits)
    else:
        default = cfg.allocator.default_boundary_bits(resolve_candidates(cfg, target_bits), target_bits)
    prefix = cfg.prefix_bits if cfg.prefix_bits is not None else default
    suffix = cfg.suffix_bits if cfg.suffix_bits is not None else default
    return prefix, suffix


def act_bits(cfg: MPConfig, w_target: int, a_target: int, bits: Sequence[int]) -> List[int]:
    """Activation bits per pack. ``fixed``: all at ``a_target``. ``follow``: shifted with the
    pack's weight bits, ``a_target + (b_j - w_target)`` clipped to 2..8 (for W=A targets this is
    the pack's own bits, as in the official code)."""
    if cfg.acts == "fixed":
        return [int(a_target)] * len(bits)
    return [min(MAX_BITS, max(MIN_BITS, int(a_target) + int(b) - int(w_target))) for b in bits]


# ---------------------------------------------------------------------------------------------
# problem and result
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MPProblem:
    """Everything an allocator needs, validated. Built by ``make_problem``.

    costs: [n_packs, n_candidates] float64 aligned with ``candidates`` (ascending), or None.
    omega: [n_packs] float64, or None."""

    cfg: MPConfig
    target_bits: int
    candidates: Tuple[int, ...]
    sizes: Tuple[int, ...]
    prefix_bits: int
    suffix_bits: int
    prefix_weights: int
    suffix_weights: int
    costs: Optional[np.ndarray]
    omega: Optional[np.ndarray]
    #: activation elements per sample quantized inside each pack / the prefix / the suffix (the
    #: official rule counts them in its storage budget); None when not given
    pack_acts: Optional[Tuple[int, ...]] = None
    prefix_acts: int = 0
    suffix_acts: int = 0
    #: the target activation bits (quant.a_bits), when the activation accounting is known
    a_target: Optional[int] = None
    #: weights / activation elements of prefix and suffix layers other than the first and last
    #: layer, where the allocator pins only those two (``Allocator.boundary == "edges"``): they
    #: stay at the target bits, as in a uniform run
    rest_weights: int = 0
    rest_acts: int = 0

    def act_bits_of(self, w_bits: int) -> int:
        """Activation bits that go with weight bits ``w_bits`` under ``mp.acts``."""
        return act_bits(self.cfg, self.target_bits, self.a_target, [w_bits])[0]

    @property
    def n_acts(self) -> int:
        return sum(self.pack_acts or ()) + self.prefix_acts + self.suffix_acts + self.rest_acts

    @property
    def n_weights(self) -> int:
        return sum(self.sizes) + self.prefix_weights + self.suffix_weights + self.rest_weights

    @property
    def fixed_bits(self) -> int:
        """Bits spent on the weights outside the packs (prefix, suffix, the rest at the target)."""
        return (self.prefix_bits * self.prefix_weights + self.suffix_bits * self.suffix_weights
                + self.target_bits * self.rest_weights)

    @property
    def fixed_act_bits(self) -> int:
        """Activation bits per sample outside the packs."""
        return (self.prefix_acts * self.act_bits_of(self.prefix_bits) + self.suffix_acts * self.act_bits_of(self.suffix_bits)
                + self.rest_acts * self.act_bits_of(self.target_bits))


@dataclass(frozen=True)
class Allocation:
    """A bit allocation and its honest accounting.

    bits: [n_packs] weight bits per pack. total_bits: weight bits over all quantized weights
    (packs + prefix + suffix); avg_bits = total_bits / n_weights (bits per weight).
    budget_avg_bits / budget_bits: the cap per weight and in total bits (None for ``none``).
    cost: summed sensitivity of the chosen bits (None when no cost table was available).
    solver: how ``budget`` solved it ("dp", "milp", "milp-time-limit", see ``solve_mckp``);
    None for the rule-based policies."""

    policy: str
    target_bits: int
    candidates: Tuple[int, ...]
    bits: Tuple[int, ...]
    sizes: Tuple[int, ...]
    prefix_bits: int
    suffix_bits: int
    prefix_weights: int
    suffix_weights: int
    total_bits: int
    avg_bits: float
    budget_avg_bits: Optional[float]
    budget_bits: Optional[int]
    cost: Optional[float]
    solver: Optional[str] = None
    #: bits per activation element achieved / allowed, when activations are accounted
    a_avg_bits: Optional[float] = None
    a_budget_avg_bits: Optional[float] = None
    #: prefix/suffix weights held at the target bits (``MPProblem.rest_weights``)
    rest_weights: int = 0

    @property
    def n_weights(self) -> int:
        return sum(self.sizes) + self.prefix_weights + self.suffix_weights + self.rest_weights

    def summary(self) -> Dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        out["n_weights"] = self.n_weights
        return out

    def describe(self) -> str:
        """One line for the log: policy, per-pack bits, achieved vs budget average bits."""
        budget = "n/a" if self.budget_avg_bits is None else f"{self.budget_avg_bits:g}"
        cost = "n/a" if self.cost is None else f"{self.cost:.6g}"
        return (
            f"mp={self.policy} target=W{self.target_bits} bits={list(self.bits)} "
            f"prefix/suffix={self.prefix_bits}/{self.suffix_bits} "
            f"avg_w_bits={self.avg_bits:.4f} (budget {budget}) over {self.n_weights} weights, "
            f"cost={cost}" + (f" solver={self.solver}" if self.solver else "")
        )
