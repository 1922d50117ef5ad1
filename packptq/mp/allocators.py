"""Pack-wise bit allocation from plain numbers: the registered allocators, the problem they
solve and the result they return. Nothing here touches a model; the pipeline side
(``packptq.mp.plan``) measures pack sizes, sensitivities and omega and passes them in.

Vocabulary and units
- ``sizes[j]``: number of quantized weights (elements) in pack j, an int >= 1.
- ``prefix_weights`` / ``suffix_weights``: quantized weights of the prefix (stem) and suffix
  (head). They sit at ``prefix_bits`` / ``suffix_bits`` and count against the budget.
- "average bits" is always bits per weight element over ALL quantized weights: packs + prefix +
  suffix. Activations are accounted separately (``packptq.mp.accounting``).
- A cost table ``cost[j][b]`` is the sensitivity (e.g. KL of the network output, nats) of pack j
  quantized at ``b`` bits; lower is better.

Entry points
- ``allocate(cfg, target_bits, sizes, cost=..., omega=..., prefix_weights=..., suffix_weights=...)``
  -> ``Allocation``; the rule is the registered allocator of ``cfg.policy``.
- ``feasible_range`` / ``check_feasible``: the range of reachable average bits, and the
  ConfigError for a budget outside it. Both depend only on ``sum(sizes)``, so per-block weight
  counts work before the packs are known.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from packptq.config import ConfigError
from packptq.mp.config import (ALLOCATORS, MAX_BITS, MIN_BITS, Allocation, Allocator, MPConfig, MPProblem,
                               boundary_bits, resolve_candidates)
from packptq.mp.solver import _chain_cost, budget_bits, solve_mckp, solve_mckp_multi

#: cost(j, bits) -> float, or a table indexed as table[j][bits] (rows may be dicts keyed by bits,
#: or sequences indexed by the bit value itself, e.g. a [n_packs, 9] array).
CostLike = Union[Callable[[int, int], float], Sequence[Mapping[int, float]],
                 Sequence[Sequence[float]], np.ndarray]


def _finalize(p: MPProblem, bits: Sequence[int], budget_avg: Optional[float],
              budget_bits: Optional[int], solver: Optional[str] = None,
              a_budget: Optional[float] = None) -> Allocation:
    bits = tuple(int(b) for b in bits)
    a_avg = None
    if p.pack_acts is not None and p.a_target is not None and p.n_acts:
        a_total = sum(a * p.act_bits_of(b) for a, b in zip(p.pack_acts, bits)) + p.fixed_act_bits
        a_avg = a_total / p.n_acts
    total = p.fixed_bits + sum(s * b for s, b in zip(p.sizes, bits))
    cost = None
    if p.costs is not None:
        idx = [p.candidates.index(b) for b in bits]
        cost = _chain_cost(p.costs, idx)
    return Allocation(
        policy=p.cfg.policy, target_bits=p.target_bits, candidates=p.candidates, bits=bits,
        sizes=p.sizes, prefix_bits=p.prefix_bits, suffix_bits=p.suffix_bits,
        prefix_weights=p.prefix_weights, suffix_weights=p.suffix_weights, total_bits=total,
        avg_bits=total / p.n_weights, budget_avg_bits=budget_avg, budget_bits=budget_bits,
        cost=cost, solver=solver, a_avg_bits=a_avg, a_budget_avg_bits=a_budget, rest_weights=p.rest_weights,
    )


def omega_costs(omega: Sequence[float], candidates: Sequence[int], target_bits: int) -> np.ndarray:
    """Cost table [n_packs, n_candidates] from omega: ``omega_j * 4**(target_bits - b)``.

    omega is measured at the target bits; one more bit halves the quantization step, and the
    second-order loss grows with the step squared, hence the factor 4 per bit."""
    om = np.asarray(omega, dtype=np.float64).reshape(-1)
    factor = np.array([4.0 ** (target_bits - b) for b in candidates], dtype=np.float64)
    return om[:, None] * factor[None, :]


def cost_table(cost: CostLike, n_packs: int, candidates: Sequence[int]) -> np.ndarray:
    """Normalise ``cost`` to a float64 array [n_packs, n_candidates] aligned with ``candidates``.

    ``cost`` is ``cost(j, bits) -> float`` or a table read as ``cost[j][bits]`` (bits is the bit
    value, not a candidate index: rows are dicts keyed by bits or sequences of length >= 9)."""
    out = np.empty((n_packs, len(candidates)), dtype=np.float64)
    for j in range(n_packs):
        for k, b in enumerate(candidates):
            try:
                out[j, k] = cost(j, b) if callable(cost) else cost[j][b]
            except (KeyError, IndexError) as exc:
                raise ValueError(
                    f"cost table has no entry for pack {j} at {b} bits (candidates "
                    f"{list(candidates)}); tables are indexed cost[pack][bits]"
                ) from exc
    if not np.all(np.isfinite(out)):
        raise ValueError("cost table has non-finite entries")
    return out


def make_problem(cfg: MPConfig, target_bits: int, sizes: Sequence[int], *,
                 cost: Optional[CostLike] = None, omega: Optional[Sequence[float]] = None,
                 prefix_weights: int = 0, suffix_weights: int = 0,
                 acts: Optional[Tuple[Sequence[int], int, int]] = None, a_target: Optional[int] = None,
                 rest: Tuple[int, int] = (0, 0)) -> MPProblem:
    """Validate the inputs of ``allocate`` and resolve defaults. See ``allocate``."""
    allocator = cfg.allocator
    candidates = resolve_candidates(cfg, target_bits)
    prefix_bits, suffix_bits = boundary_bits(cfg, target_bits)
    sizes_t = tuple(int(s) for s in sizes)
    if len(sizes_t) == 0:
        raise ValueError("need at least one pack")
    if any(s < 1 for s in sizes_t):
        raise ValueError(f"pack sizes must be >= 1 weight, got {list(sizes_t)}")
    if prefix_weights < 0 or suffix_weights < 0:
        raise ValueError("prefix_weights and suffix_weights must be >= 0")
    n = len(sizes_t)
    om = None
    if omega is not None:
        om = np.asarray(omega, dtype=np.float64).reshape(-1)
        if om.shape != (n,) or not np.all(np.isfinite(om)):
            raise ValueError(f"omega must be {n} finite numbers (one per pack), got {list(om)}")
    source = allocator.cost_source(cfg)
    table = None
    if cost is not None:
        if source == "omega":
            raise ValueError("mp.sensitivity=omega builds the cost from omega; do not pass cost")
        table = cost_table(cost, n, candidates)
    elif om is not None and cfg.sensitivity == "omega":
        table = omega_costs(om, candidates, target_bits)
    if source is not None and table is None:
        need = "omega" if source == "omega" else "a cost table (cost=...)"
        raise ValueError(f"mp.policy={cfg.policy} with mp.sensitivity={cfg.sensitivity} needs {need}")
    if allocator.needs_omega(cfg) and om is None:
        raise ValueError(f"mp.policy={cfg.policy} needs omega (one score per pack)")
    pack_acts, prefix_acts, suffix_acts = (None, 0, 0) if acts is None else acts
    if pack_acts is not None:
        pack_acts = tuple(int(a) for a in pack_acts)
        if len(pack_acts) != n or min(pack_acts + (int(prefix_acts), int(suffix_acts))) < 0:
            raise ValueError(f"acts must give {n} pack counts and prefix/suffix counts >= 0")
    if min(rest) < 0:
        raise ValueError(f"rest weights and activations must be >= 0, got {rest}")
    return MPProblem(cfg, target_bits, candidates, sizes_t, prefix_bits, suffix_bits,
                     int(prefix_weights), int(suffix_weights), table, om, pack_acts, int(prefix_acts),
                     int(suffix_acts), a_target, int(rest[0]), int(rest[1]))


def allocate(cfg: MPConfig, target_bits: int, sizes: Sequence[int], *,
             cost: Optional[CostLike] = None, omega: Optional[Sequence[float]] = None,
             prefix_weights: int = 0, suffix_weights: int = 0,
             acts: Optional[Tuple[Sequence[int], int, int]] = None, a_target: Optional[int] = None,
             rest: Tuple[int, int] = (0, 0)) -> Allocation:
    """Choose weight bits per pack with the registered allocator of ``cfg.policy``.

    target_bits: the target weight bits (quant.w_bits), 2..8.
    sizes: [n_packs] quantized weights per pack.
    cost: sensitivity per (pack, bits), see ``cost_table``; required by ``budget`` with
      ``sensitivity=kl``; otherwise optional and only used to report ``Allocation.cost``.
    omega: [n_packs] ranking scores; required by ``official`` and by ``budget`` with
      ``sensitivity=omega``.
    prefix_weights / suffix_weights: weights outside the packs, at ``boundary_bits(cfg, ...)``.
    acts: (per-pack, prefix, suffix) activation elements per sample, for rules that count
      activations in their budget (``official``; ``budget`` with ``mp.acts=follow`` and
      ``a_target``, which then holds the activation average to ``mp.a_avg_bits`` too).
    a_target: the target activation bits (quant.a_bits).
    rest: (weights, activation elements per sample) of prefix/suffix layers held at the target
      bits (all but the first and last layer, for allocators with ``boundary == "edges"``).

    Raises ConfigError for a budget outside ``feasible_range`` (before any solving) and
    ValueError for malformed inputs."""
    problem = make_problem(cfg, target_bits, sizes, cost=cost, omega=omega,
                           prefix_weights=prefix_weights, suffix_weights=suffix_weights, acts=acts,
                           a_target=a_target, rest=rest)
    return cfg.allocator.allocate(problem)


# ---------------------------------------------------------------------------------------------
# feasibility
# ---------------------------------------------------------------------------------------------
class _Reach(NamedTuple):
    """Total weight bits with every pack at the lowest (``lo_bits``) resp. highest
    (``hi_bits``) candidate, prefix/suffix at their bits, over ``n`` quantized weights."""

    lo_bits: int
    hi_bits: int
    n: int
    candidates: Tuple[int, ...]
    prefix_bits: int
    suffix_bits: int
    uniform_bits: int  # every pack at the target bits


def _reach(cfg: MPConfig, target_bits: int, sizes: Sequence[int], prefix_weights: int,
           suffix_weights: int, rest_weights: int = 0) -> _Reach:
    candidates = resolve_candidates(cfg, target_bits)
    prefix_bits, suffix_bits = boundary_bits(cfg, target_bits)
    s = int(sum(int(x) for x in sizes))
    n = s + prefix_weights + suffix_weights + rest_weights
    if n <= 0:
        raise ValueError("no quantized weights")
    fixed = prefix_bits * prefix_weights + suffix_bits * suffix_weights + target_bits * rest_weights
    return _Reach(fixed + candidates[0] * s, fixed + candidates[-1] * s, n, candidates,
                  prefix_bits, suffix_bits, fixed + target_bits * s)


def feasible_range(cfg: MPConfig, target_bits: int, sizes: Sequence[int],
                   prefix_weights: int = 0, suffix_weights: int = 0, rest_weights: int = 0) -> Tuple[float, float]:
    """(lo, hi) average bits per weight reachable with ``cfg``'s candidates: every pack at the
    lowest candidate, resp. the highest, prefix/suffix at their bits. Depends on sizes only
    through ``sum(sizes)``, so per-block weight counts work before packing.

    For ``none`` lo == hi == the achieved average; for ``official`` it is (all mid, all high)."""
    r = _reach(cfg, target_bits, sizes, prefix_weights, suffix_weights, rest_weights)
    return r.lo_bits / r.n, r.hi_bits / r.n


def uniform_budget(cfg: MPConfig) -> bool:
    """Whether the weight budget is the uniform model's average (``mp.budget=uniform``, no
    explicit ``mp.avg_bits``)."""
    return cfg.policy == "budget" and cfg.avg_bits is None and cfg.budget == "uniform"


def check_feasible(cfg: MPConfig, target_bits: int, sizes: Sequence[int],
                   prefix_weights: int = 0, suffix_weights: int = 0, rest_weights: int = 0) -> Tuple[float, float]:
    """``feasible_range``, after checking a user-given budget against it: ConfigError when the
    allocator reads ``mp.avg_bits`` and it lies outside (below: no allocation fits; above:
    every pack at the top candidate still under-spends it). The message names the range.
    Cheap: the pipeline calls it before any compute."""
    r = _reach(cfg, target_bits, sizes, prefix_weights, suffix_weights, rest_weights)
    allocator = cfg.allocator
    if allocator.reads_avg_bits:
        if uniform_budget(cfg):
            avg, want = r.uniform_bits / r.n, Fraction(r.uniform_bits)
        else:
            avg = allocator.budget_avg_bits(cfg, r.candidates, target_bits)
            want = Fraction(repr(float(avg))) * r.n
        if not r.lo_bits <= want <= r.hi_bits:
            # shown rounded inwards, so a value copied from the message is feasible
            lo = math.ceil(r.lo_bits / r.n * 1e4) / 1e4
            hi = math.floor(r.hi_bits / r.n * 1e4) / 1e4
            side = "below the smallest" if want < r.lo_bits else "above the largest"
            raise ConfigError(
                f"mp.avg_bits={avg:g} is {side} reachable average: with candidates "
                f"{list(r.candidates)} and prefix/suffix at {r.prefix_bits}/{r.suffix_bits} bits "
                f"over {r.n} quantized weights the feasible range of mp.avg_bits is "
                f"[{lo:.4f}, {hi:.4f}] bits per weight"
            )
    return r.lo_bits / r.n, r.hi_bits / r.n


# ---------------------------------------------------------------------------------------------
# the allocators
# ---------------------------------------------------------------------------------------------
def allocator(name: str) -> Callable[[type], type]:
    """Register one instance of the ``Allocator`` subclass it decorates as ``mp.policy=name``."""

    def make(cls: type) -> Allocator:
        cls.name = name
        return cls()

    return ALLOCATORS.register(name, make=make)


@allocator("none")
class NoneAllocator(Allocator):
    """Every pack at the target bits; the pipeline keeps the quant config's bits everywhere."""

    takes_candidates = False
    sets_bits = False

    def default_candidates(self, target_bits: int) -> Tuple[int, ...]:
        return (target_bits,)

    def allocate(self, p: MPProblem) -> Allocation:
        return _finalize(p, [p.target_bits] * len(p.sizes), None, None)


@allocator("budget")
class BudgetAllocator(Allocator):
    """Exact minimum-cost allocation with average weight bits <= avg_bits (``solve_mckp``).
    Default candidates: [target-1, target, target+1] clipped to 2..8."""

    reads_avg_bits = True

    def default_candidates(self, target_bits: int) -> Tuple[int, ...]:
        around = (target_bits - 1, target_bits, target_bits + 1)
        return tuple(b for b in around if MIN_BITS <= b <= MAX_BITS)

    def budget_avg_bits(self, cfg: MPConfig, candidates: Tuple[int, ...],
                        target_bits: int) -> Optional[float]:
        return float(cfg.avg_bits) if cfg.avg_bits is not None else float(target_bits)

    def cost_source(self, cfg: MPConfig) -> Optional[str]:
        return cfg.sensitivity

    def allocate(self, p: MPProblem) -> Allocation:
        check_feasible(p.cfg, p.target_bits, p.sizes, p.prefix_weights, p.suffix_weights, p.rest_weights)
        if uniform_budget(p.cfg):  # the uniform model's total, exactly
            cap = p.fixed_bits + p.target_bits * int(sum(p.sizes))
            avg = cap / p.n_weights
        else:
            avg = self.budget_avg_bits(p.cfg, p.candidates, p.target_bits)
            cap = budget_bits(avg, p.n_weights)
        if p.cfg.acts == "follow" and p.pack_acts is not None and p.a_target is not None and p.n_acts:
            return self._weights_and_acts(p, avg, cap)
        sol = solve_mckp(p.sizes, p.candidates, p.costs, cap - p.fixed_bits)
        return _finalize(p, [p.candidates[i] for i in sol.choice], avg, cap, sol.solver)

    def _weights_and_acts(self, p: MPProblem, avg: float, cap: int) -> Allocation:
        """Activations follow the weights: hold the weight average to ``avg`` and the activation
        average (elements per sample) to ``mp.a_avg_bits``, each exactly (two knapsack rows)."""
        a_bits = [p.act_bits_of(b) for b in p.candidates]
        a_fixed = p.fixed_act_bits
        if p.cfg.a_avg_bits is None and p.cfg.budget == "uniform":  # the uniform model's total
            a_cap = a_fixed + p.act_bits_of(p.target_bits) * int(sum(p.pack_acts))
            a_avg = a_cap / p.n_acts
        else:
            a_avg = float(p.cfg.a_avg_bits) if p.cfg.a_avg_bits is not None else float(p.a_target)
            a_cap = budget_bits(a_avg, p.n_acts)
        w_use = np.array([[s * b for b in p.candidates] for s in p.sizes])
        a_use = np.array([[a * ab for ab in a_bits] for a in p.pack_acts])
        try:
            sol = solve_mckp_multi(p.costs, [w_use, a_use], [cap - p.fixed_bits, a_cap - a_fixed])
        except ValueError:
            lo = (a_fixed + int(a_use.min(axis=1).sum())) / p.n_acts
            raise ConfigError(f"mp.a_avg_bits={a_avg:g} cannot be met together with mp.avg_bits={avg:g}: the "
                              f"activation average reaches at least {lo:.4f} bits with candidates "
                              f"{list(p.candidates)}") from None
        return _finalize(p, [p.candidates[i] for i in sol.choice], avg, cap, sol.solver, a_budget=a_avg)


#: the official code's bit choices per target: (low, mid, high); the rule uses mid and high
OFFICIAL_CHOICES = {3: (2, 3, 4), 4: (3, 4, 6), 6: (4, 6, 8)}


@allocator("official")
class OfficialAllocator(Allocator):
    """The official Pack-PTQ rule (its ``mixed_precision.py``), point by point:

    1. candidates (mid, high) from its table {3: (3, 4), 4: (4, 6), 6: (6, 8)} for a target of
       3, 4 or 6 bits (others need ``mp.candidates=[mid, high]``);
    2. modules outside the packs (prefix, suffix) at high, weights and activations, whatever
       ``quant.first_last_bits`` says;
    3. a pack's score is the mean omega of its blocks, omega from the official block score
       (``packing.loss=official``);
    4. storage counts weights plus per-sample input activations of every quantized module;
       the budget is (mid + high) / 2 times the whole model's storage elements, less the
       prefix and suffix at high;
    5. every pack starts at mid; packs are visited from the highest score down (ties: earlier
       pack first) and each is raised to high when the packs' storage still fits the budget,
       else left at mid and the next one is tried;
    6. a pack's activations take its bits (``mp.acts=follow``).
    Without activation counts (``acts`` not given) storage is weights alone."""

    boundary = "units"  # its prefix and suffix modules, whole, at high

    sensitivity = "omega"
    pack_omega = "mean"
    score_loss = "official"
    boundary_from_quant = False

    def validate(self, cfg: MPConfig) -> None:
        super().validate(cfg)
        if cfg.candidates is not None and len(cfg.candidates) != 2:
            raise ConfigError(
                "mp.policy=official takes exactly two candidates (mid, high), got "
                f"{list(cfg.candidates)}"
            )

    def default_candidates(self, target_bits: int) -> Tuple[int, ...]:
        if target_bits not in OFFICIAL_CHOICES:
            raise ConfigError(
                f"mp.policy=official has bit choices for targets {sorted(OFFICIAL_CHOICES)} only "
                f"(quant.w_bits={target_bits}); give mp.candidates=[mid, high] explicitly"
            )
        return OFFICIAL_CHOICES[target_bits][1:]

    def default_boundary_bits(self, candidates: Tuple[int, ...], target_bits: int) -> int:
        return candidates[-1]

    def budget_avg_bits(self, cfg: MPConfig, candidates: Tuple[int, ...],
                        target_bits: int) -> Optional[float]:
        return (candidates[0] + candidates[-1]) / 2

    def needs_omega(self, cfg: MPConfig) -> bool:
        return True

    def allocate(self, p: MPProblem) -> Allocation:
        mid, high = p.candidates
        acts = p.pack_acts or (0,) * len(p.sizes)
        elems = [s + a for s, a in zip(p.sizes, acts)]
        boundary = (p.prefix_weights + p.prefix_acts, p.suffix_weights + p.suffix_acts)
        total = sum(elems) + sum(boundary)
        # twice the budget, so that (mid + high) / 2 stays an integer comparison
        limit2 = (mid + high) * total - 2 * (p.prefix_bits * boundary[0] + p.suffix_bits * boundary[1])
        bits = [mid] * len(p.sizes)
        used = mid * sum(elems)
        for j in sorted(range(len(p.sizes)), key=lambda i: (-p.omega[i], i)):
            step = (high - mid) * elems[j]
            if 2 * (used + step) <= limit2:
                bits[j] = high
                used += step
        return _finalize(p, bits, (mid + high) / 2, (mid + high) * total // 2)
