"""Pack-wise bit allocation and bit accounting (DESIGN.md §1, "Pack-wise mixed precision").

Pure Python/numpy: nothing here touches a model. The pipeline measures pack sizes, the
sensitivity table and ``omega``, and passes plain numbers in.

Vocabulary and units
- ``sizes[j]``: number of quantized weights (elements) in pack j, an int >= 1.
- ``prefix_weights`` / ``suffix_weights``: quantized weights of the prefix (stem) and suffix
  (head). They sit at ``prefix_bits`` / ``suffix_bits`` and count against the budget.
- "average bits" is always bits per weight element over ALL quantized weights: packs + prefix +
  suffix. Activations are accounted separately (``avg_act_bits``).
- A cost table ``cost[j][b]`` is the sensitivity (e.g. KL of the network output, nats) of pack j
  quantized at ``b`` bits; lower is better.

Entry points
- ``allocate(cfg, target_bits, sizes, cost=..., omega=..., prefix_weights=..., suffix_weights=...)``
  -> ``Allocation``; the policy is picked from ``ALLOCATORS`` by ``cfg.policy``.
- ``feasible_range`` / ``check_feasible``: the range of reachable average bits, and the early
  ConfigError the pipeline raises before any compute. Both depend only on ``sum(sizes)``, so the
  pipeline can call them with per-block weight counts before the packs are known.
- Accounting: ``avg_weight_bits``, ``avg_act_bits``, ``model_size_bytes``, ``act_bits``,
  ``bits_json`` / ``load_bits_json`` (``bits.json``, versioned).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from packptq.config import ConfigError
from packptq.registry import Registry

MIN_BITS, MAX_BITS = 2, 8
BITS_JSON_VERSION = 1
SENSITIVITIES = ("kl", "omega")
ACT_MODES = ("follow", "fixed")

#: cost(j, bits) -> float, or a table indexed as table[j][bits] (rows may be dicts keyed by bits,
#: or sequences indexed by the bit value itself, e.g. a [n_packs, 9] array).
CostLike = Union[Callable[[int, int], float], Sequence[Mapping[int, float]],
                 Sequence[Sequence[float]], np.ndarray]

log = logging.getLogger(__name__)

#: name -> allocator(problem: MPProblem) -> Allocation
ALLOCATORS: Registry[Callable[["MPProblem"], "Allocation"]] = Registry("bit allocator")


def _check_bits(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@dataclass
class MPConfig:
    """The ``mp`` config section (conf/mp/*.yaml).

    policy: ``none`` (every pack at the target), ``budget`` (exact multiple-choice knapsack under
      ``avg_bits``), ``official`` (the official code's greedy rule; a (mid+high)/2-bit model).
    avg_bits: budget in bits per weight over all quantized weights; null = the target weight
      bits. Only ``budget`` reads it.
    candidates: bit-widths a pack may take; null = [target-1, target, target+1] clipped to 2..8
      (``budget``) or [target, target+1] (``official``, which needs exactly two values).
    sensitivity: what ``budget`` minimises: ``kl`` (a measured cost table per pack and bit-width)
      or ``omega`` (``omega_j * 4**(target - b)``, see ``omega_costs``). ``official`` always
      ranks by omega and requires ``omega``.
    acts: ``follow`` (a pack's activation bits move with its weight bits, see ``act_bits``) or
      ``fixed`` (activations stay at the target activation bits).
    prefix_bits / suffix_bits: weight bits of the prefix (stem) and suffix (head); null = the
      target (``none``, ``budget``) or the high candidate (``official``).
    """

    policy: str = "none"
    avg_bits: Optional[float] = None
    candidates: Optional[List[int]] = None
    sensitivity: str = "kl"
    acts: str = "follow"
    prefix_bits: Optional[int] = None
    suffix_bits: Optional[int] = None

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
        if self.avg_bits is not None:
            if not math.isfinite(self.avg_bits) or not MIN_BITS <= self.avg_bits <= MAX_BITS:
                raise ConfigError(
                    f"mp.avg_bits must be in [{MIN_BITS}, {MAX_BITS}] or null, got {self.avg_bits}"
                )
            if self.policy != "budget":
                # a parsed option that does nothing is a bug magnet (DESIGN.md §1 pitfalls)
                raise ConfigError(
                    f"mp.avg_bits is only used by mp.policy=budget (policy is '{self.policy}'); "
                    "set mp.avg_bits=null"
                )
        if self.candidates is not None:
            if len(self.candidates) == 0:
                raise ConfigError("mp.candidates must be null or a non-empty list of bit-widths")
            for b in self.candidates:
                _check_bits(b, "every mp.candidates entry")
            if len(set(self.candidates)) != len(self.candidates):
                raise ConfigError(f"mp.candidates has duplicates: {list(self.candidates)}")
            if self.policy == "none":
                raise ConfigError("mp.candidates is unused by mp.policy=none; set it to null")
            if self.policy == "official" and len(self.candidates) != 2:
                raise ConfigError(
                    "mp.policy=official takes exactly two candidates (mid, high), got "
                    f"{list(self.candidates)}"
                )
        if self.policy == "official" and self.sensitivity != "omega":
            raise ConfigError("mp.policy=official ranks packs by omega; set mp.sensitivity=omega")
        for name in ("prefix_bits", "suffix_bits"):
            value = getattr(self, name)
            if value is not None:
                _check_bits(value, f"mp.{name}")


def resolve_candidates(cfg: MPConfig, target_bits: int) -> Tuple[int, ...]:
    """The ascending candidate bit-widths for ``cfg.policy`` at ``target_bits``."""
    _check_bits(target_bits, "the target weight bits (quant.w_bits)")
    if cfg.policy == "none":
        return (target_bits,)
    if cfg.candidates is not None:
        return tuple(sorted(cfg.candidates))
    if cfg.policy == "official":
        if target_bits + 1 > MAX_BITS:
            raise ConfigError(
                f"mp.policy=official upgrades packs to target+1 = {target_bits + 1} bits, above "
                f"{MAX_BITS}; give mp.candidates=[mid, high] explicitly"
            )
        return (target_bits, target_bits + 1)
    around = (target_bits - 1, target_bits, target_bits + 1)
    return tuple(b for b in around if MIN_BITS <= b <= MAX_BITS)


def boundary_bits(cfg: MPConfig, target_bits: int) -> Tuple[int, int]:
    """(prefix_bits, suffix_bits): explicit values, else the high candidate for ``official`` and
    the target otherwise."""
    default = resolve_candidates(cfg, target_bits)[-1] if cfg.policy == "official" else target_bits
    prefix = cfg.prefix_bits if cfg.prefix_bits is not None else default
    suffix = cfg.suffix_bits if cfg.suffix_bits is not None else default
    return prefix, suffix


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

    @property
    def n_weights(self) -> int:
        return sum(self.sizes) + self.prefix_weights + self.suffix_weights

    @property
    def fixed_bits(self) -> int:
        """Bits spent on the prefix and suffix weights."""
        return self.prefix_bits * self.prefix_weights + self.suffix_bits * self.suffix_weights


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

    @property
    def n_weights(self) -> int:
        return sum(self.sizes) + self.prefix_weights + self.suffix_weights

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


def _finalize(p: MPProblem, bits: Sequence[int], budget_avg: Optional[float],
              budget_bits: Optional[int], solver: Optional[str] = None) -> Allocation:
    bits = tuple(int(b) for b in bits)
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
        cost=cost, solver=solver,
    )


def _chain_cost(costs: np.ndarray, idx: Sequence[int]) -> float:
    """sum_j costs[j, idx[j]], added from the last pack to the first, exactly as the DP adds it,
    so equal allocations compare equal to the last bit."""
    total = np.float64(0.0)
    for j in range(len(idx) - 1, -1, -1):
        total = costs[j, idx[j]] + total
    return float(total)


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
                 prefix_weights: int = 0, suffix_weights: int = 0) -> MPProblem:
    """Validate the inputs of ``allocate`` and resolve defaults. See ``allocate``."""
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
    table = None
    if cost is not None:
        if cfg.policy == "budget" and cfg.sensitivity == "omega":
            raise ValueError("mp.sensitivity=omega builds the cost from omega; do not pass cost")
        table = cost_table(cost, n, candidates)
    elif om is not None and cfg.sensitivity == "omega":
        table = omega_costs(om, candidates, target_bits)
    if cfg.policy == "budget" and table is None:
        need = "omega" if cfg.sensitivity == "omega" else "a cost table (cost=...)"
        raise ValueError(f"mp.policy=budget with mp.sensitivity={cfg.sensitivity} needs {need}")
    if cfg.policy == "official" and om is None:
        raise ValueError("mp.policy=official needs omega (one score per pack)")
    return MPProblem(cfg, target_bits, candidates, sizes_t, prefix_bits, suffix_bits,
                     int(prefix_weights), int(suffix_weights), table, om)


def allocate(cfg: MPConfig, target_bits: int, sizes: Sequence[int], *,
             cost: Optional[CostLike] = None, omega: Optional[Sequence[float]] = None,
             prefix_weights: int = 0, suffix_weights: int = 0) -> Allocation:
    """Choose weight bits per pack with the allocator ``cfg.policy``.

    target_bits: the target weight bits (quant.w_bits), 2..8.
    sizes: [n_packs] quantized weights per pack.
    cost: sensitivity per (pack, bits), see ``cost_table``; required by ``budget`` with
      ``sensitivity=kl``; otherwise optional and only used to report ``Allocation.cost``.
    omega: [n_packs] ranking scores; required by ``official`` and by ``budget`` with
      ``sensitivity=omega``.
    prefix_weights / suffix_weights: weights outside the packs, at ``boundary_bits(cfg, ...)``.

    Raises ConfigError for a budget outside ``feasible_range`` (before any solving) and
    ValueError for malformed inputs."""
    problem = make_problem(cfg, target_bits, sizes, cost=cost, omega=omega,
                           prefix_weights=prefix_weights, suffix_weights=suffix_weights)
    return ALLOCATORS.get(cfg.policy)(problem)


# ---------------------------------------------------------------------------------------------
# budget: feasibility and the exact solver
# ---------------------------------------------------------------------------------------------
def budget_bits(avg_bits: float, n_weights: int) -> int:
    """floor(avg_bits * n_weights), with avg_bits read as the decimal it was written as (3.1 is
    31/10, not the nearest double), so a budget of 3.1 bits over 10 weights is 31 bits."""
    return math.floor(Fraction(repr(float(avg_bits))) * n_weights)


def feasible_range(cfg: MPConfig, target_bits: int, sizes: Sequence[int],
                   prefix_weights: int = 0, suffix_weights: int = 0) -> Tuple[float, float]:
    """(lo, hi) average bits per weight reachable with ``cfg``'s candidates: every pack at the
    lowest candidate, resp. the highest, prefix/suffix at their bits. Depends on sizes only
    through ``sum(sizes)``, so per-block weight counts work before packing.

    For ``none`` lo == hi == the achieved average; for ``official`` it is (all mid, all high)."""
    candidates = resolve_candidates(cfg, target_bits)
    prefix_bits, suffix_bits = boundary_bits(cfg, target_bits)
    s = int(sum(int(x) for x in sizes))
    n = s + prefix_weights + suffix_weights
    if n <= 0:
        raise ValueError("no quantized weights")
    fixed = prefix_bits * prefix_weights + suffix_bits * suffix_weights
    return (fixed + candidates[0] * s) / n, (fixed + candidates[-1] * s) / n


def check_feasible(cfg: MPConfig, target_bits: int, sizes: Sequence[int],
                   prefix_weights: int = 0, suffix_weights: int = 0) -> None:
    """Raise ConfigError when ``budget``'s avg_bits is outside ``feasible_range`` (below: no
    allocation fits; above: every pack at the top candidate still under-spends it). A no-op for
    other policies. Cheap: the pipeline calls it before any compute."""
    if cfg.policy != "budget":
        return
    candidates = resolve_candidates(cfg, target_bits)
    prefix_bits, suffix_bits = boundary_bits(cfg, target_bits)
    avg = cfg.avg_bits if cfg.avg_bits is not None else float(target_bits)
    s = int(sum(int(x) for x in sizes))
    n = s + prefix_weights + suffix_weights
    if n <= 0:
        raise ValueError("no quantized weights")
    fixed = prefix_bits * prefix_weights + suffix_bits * suffix_weights
    lo_bits, hi_bits = fixed + candidates[0] * s, fixed + candidates[-1] * s
    want = Fraction(repr(float(avg))) * n
    if lo_bits <= want <= hi_bits:
        return
    # shown rounded inwards, so a value copied from the message is feasible
    lo = math.ceil(lo_bits / n * 1e4) / 1e4
    hi = math.floor(hi_bits / n * 1e4) / 1e4
    side = "below the smallest" if want < lo_bits else "above the largest"
    raise ConfigError(
        f"mp.avg_bits={avg:g} is {side} reachable average: with candidates {list(candidates)} "
        f"and prefix/suffix at {prefix_bits}/{suffix_bits} bits over {n} quantized weights the "
        f"feasible range of mp.avg_bits is [{lo:.4f}, {hi:.4f}] bits per weight"
    )


class Solution(NamedTuple):
    """choice[j]: candidate index of pack j; cost: summed cost (last pack to first);
    solver: "dp" (exact), "milp" (optimal within HiGHS tolerances) or "milp-time-limit" (the
    best allocation HiGHS found in time; not proven optimal)."""

    choice: List[int]
    cost: float
    solver: str


def solve_mckp(sizes: Sequence[int], candidates: Sequence[int], costs: np.ndarray,
               capacity_bits: int, *, max_states: int = 200_000,
               time_limit_s: float = 60.0) -> Solution:
    """Multiple-choice knapsack: pick one candidate per pack minimising
    ``sum_j costs[j, k_j]`` subject to ``sum_j sizes[j] * candidates[k_j] <= capacity_bits``.

    sizes: [n] weights per pack; candidates: ascending bit-widths [K]; costs: [n, K];
    capacity_bits: total bits the packs may use. Raises ValueError when even the all-minimum
    allocation does not fit.

    Method: an exact backward DP over packs on "bits above the all-minimum allocation", with the
    weights divided by their gcd. States are sparse: a (weight, cost, suffix) state is dropped
    when another one weighs no more and is better in (cost, lexicographic) order, so the state
    count never exceeds min(capacity / gcd + 1, prod_j K); with measured (noisy) costs it stays
    in the hundreds even for 50 packs of millions of weights.

    Ties (DP): among allocations of equal total cost the lexicographically smallest bits vector
    wins, i.e. fewer bits in earlier packs. Costs are compared as the DP's floating-point sums
    (``_chain_cost``): exactly equal sums tie.

    Fallback: costs that are (nearly) proportional to weight make almost every state Pareto-
    optimal; that is subset-sum and the state count explodes. If a level would keep more than
    ``max_states`` states, the problem goes to ``scipy.optimize.milp`` (HiGHS, binary variables,
    zero relative gap, ``time_limit_s``); its answer is checked in integer arithmetic and
    re-solved with a tighter capacity if its tolerance let it overshoot. Such a solution is
    deterministic but need not follow the DP's tie rule; ``solver`` says which method answered."""
    sizes_a = np.asarray([int(s) for s in sizes], dtype=np.int64)
    cand = np.asarray([int(b) for b in candidates], dtype=np.int64)
    costs = np.asarray(costs, dtype=np.float64)
    n, K = costs.shape
    if sizes_a.shape != (n,) or cand.shape != (K,) or np.any(np.diff(cand) <= 0):
        raise ValueError("sizes [n], ascending candidates [K] and costs [n, K] do not match")
    extra = int(capacity_bits) - int(cand[0]) * int(sizes_a.sum())
    if extra < 0:
        raise ValueError("capacity is below the all-minimum allocation")
    w = sizes_a[:, None] * (cand - cand[0])[None, :]  # [n, K] bits above the minimum
    positive = w[w > 0]
    g = int(np.gcd.reduce(positive)) if positive.size else 1
    w //= g
    extra = min(extra // g, int(w.max(axis=1).sum()))  # more room than all-max changes nothing
    choice = _mckp_dp(w, costs, extra, max_states)
    if choice is not None:
        return Solution(choice, _chain_cost(costs, choice), "dp")
    log.warning("bit allocation: %d packs need more than %d DP states; solving with "
                "scipy.optimize.milp instead", n, max_states)
    choice, proven = _mckp_milp(w, costs, extra, time_limit_s)
    return Solution(choice, _chain_cost(costs, choice), "milp" if proven else "milp-time-limit")


def _mckp_dp(w: np.ndarray, costs: np.ndarray, extra: int,
             max_states: int) -> Optional[List[int]]:
    """The sparse DP of ``solve_mckp``: w [n, K] int64 weights, extra the capacity. None when a
    level needs more than ``max_states`` states."""
    n, K = costs.shape
    # level j holds states for packs j..n-1, sorted by their bits vector (lexicographic), so a
    # state's position is its lexicographic rank and the flat index k * m + parent of an
    # expansion is the rank order of (k, parent's suffix)
    W = np.zeros(1, dtype=np.int64)
    C = np.zeros(1, dtype=np.float64)
    trail: List[Tuple[np.ndarray, np.ndarray]] = []  # per level, from j = n-1 down to 0
    for j in range(n - 1, -1, -1):
        m = W.shape[0]
        Wn = (w[j][:, None] + W[None, :]).ravel()
        Cn = (costs[j][:, None] + C[None, :]).ravel()
        flat = np.nonzero(Wn <= extra)[0]
        Wn, Cn = Wn[flat], Cn[flat]
        by_value = np.lexsort((flat, Cn))  # best (cost, lex) first
        rank = np.empty_like(by_value)
        rank[by_value] = np.arange(by_value.size)
        by_weight = np.lexsort((rank, Wn))
        r = rank[by_weight]
        best_before = np.minimum.accumulate(np.concatenate(([r.size], r[:-1])))
        keep = np.sort(by_weight[r < best_before])  # back to lexicographic order
        if keep.size > max_states:
            return None
        W, C = Wn[keep], Cn[keep]
        src = flat[keep]
        trail.append((src % m, src // m))  # (parent state, candidate index)
    s = int(np.lexsort((np.arange(C.size), C))[0])
    choice: List[int] = []
    for parent, k in reversed(trail):  # j = 0 .. n-1
        choice.append(int(k[s]))
        s = int(parent[s])
    return choice


def _mckp_milp(w: np.ndarray, costs: np.ndarray, extra: int,
               time_limit_s: float) -> Tuple[List[int], bool]:
    """The ILP fallback of ``solve_mckp``: (choice, proven optimal)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    n, K = costs.shape
    one_each = csr_matrix((np.ones(n * K), (np.repeat(np.arange(n), K), np.arange(n * K))),
                          shape=(n, n * K))
    scale = float(np.abs(costs).max()) or 1.0  # HiGHS's absolute gap is then relative
    c = (costs / scale).ravel()
    rhs = extra
    for _ in range(5):
        res = milp(
            c, integrality=np.ones(n * K), bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one_each, 1, 1),
                         LinearConstraint(w.reshape(1, -1).astype(np.float64), -np.inf, rhs)],
            options={"mip_rel_gap": 0.0, "time_limit": time_limit_s, "presolve": True},
        )
        if res.x is None:
            raise RuntimeError(f"scipy.optimize.milp found no allocation: {res.message}")
        choice = [int(i) for i in np.argmax(res.x.reshape(n, K), axis=1)]
        used = int(sum(int(w[j, k]) for j, k in enumerate(choice)))
        if used <= extra:
            return choice, res.status == 0
        rhs -= used - extra  # the solver's feasibility tolerance let it overshoot
    raise RuntimeError("scipy.optimize.milp kept exceeding the bit budget")


# ---------------------------------------------------------------------------------------------
# the allocators
# ---------------------------------------------------------------------------------------------
@ALLOCATORS.register("none")
def _allocate_none(p: MPProblem) -> Allocation:
    """Every pack at the target bits."""
    return _finalize(p, [p.target_bits] * len(p.sizes), None, None)


@ALLOCATORS.register("budget")
def _allocate_budget(p: MPProblem) -> Allocation:
    """Exact minimum-cost allocation with average weight bits <= avg_bits (``solve_mckp``)."""
    check_feasible(p.cfg, p.target_bits, p.sizes, p.prefix_weights, p.suffix_weights)
    avg = p.cfg.avg_bits if p.cfg.avg_bits is not None else float(p.target_bits)
    cap = budget_bits(avg, p.n_weights)
    sol = solve_mckp(p.sizes, p.candidates, p.costs, cap - p.fixed_bits)
    return _finalize(p, [p.candidates[i] for i in sol.choice], float(avg), cap, sol.solver)


@ALLOCATORS.register("official")
def _allocate_official(p: MPProblem) -> Allocation:
    """The official Pack-PTQ rule: packs start at mid; in decreasing omega order (ties: earlier
    pack first) each pack is upgraded to high if the average over all quantized weights then
    stays <= (mid + high) / 2, otherwise it is skipped and the next one is tried. Prefix/suffix
    sit at ``boundary_bits`` (high by default) and count against the budget.

    Deviation from the official code, on purpose: it counts activation elements in its storage
    budget too; here the budget is over weights only, as the reported average is."""
    mid, high = p.candidates
    bits = [mid] * len(p.sizes)
    used = p.fixed_bits + mid * sum(p.sizes)
    limit2 = (mid + high) * p.n_weights  # compare 2 * used <= limit2: no rounding
    for j in sorted(range(len(p.sizes)), key=lambda i: (-p.omega[i], i)):
        step = (high - mid) * p.sizes[j]
        if 2 * (used + step) <= limit2:
            bits[j] = high
            used += step
    return _finalize(p, bits, (mid + high) / 2, limit2 // 2)


# ---------------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------------
def _weighted_mean(counts: Sequence[int], bits: Sequence[int], what: str) -> float:
    if len(counts) != len(bits):
        raise ValueError(f"{what}: {len(counts)} counts but {len(bits)} bit-widths")
    total = sum(int(c) for c in counts)
    if total <= 0:
        raise ValueError(f"{what}: counts sum to {total}")
    return sum(int(c) * int(b) for c, b in zip(counts, bits)) / total


def avg_weight_bits(sizes: Sequence[int], bits: Sequence[int]) -> float:
    """Average bits per weight: sum(sizes * bits) / sum(sizes). sizes: weights per group (pass
    prefix and suffix as groups of their own to get the model average)."""
    return _weighted_mean(sizes, bits, "avg_weight_bits")


def avg_act_bits(act_elems: Sequence[int], bits: Sequence[int]) -> float:
    """Average bits per activation element: weighted by ``act_elems``, the quantized activation
    elements per sample (one input image) of each quantizer or group."""
    return _weighted_mean(act_elems, bits, "avg_act_bits")


def act_bits(cfg: MPConfig, w_target: int, a_target: int, bits: Sequence[int]) -> List[int]:
    """Activation bits per pack. ``fixed``: all at ``a_target``. ``follow``: shifted with the
    pack's weight bits, ``a_target + (b_j - w_target)`` clipped to 2..8 (for W=A targets this is
    the pack's own bits, as in the official code)."""
    if cfg.acts == "fixed":
        return [int(a_target)] * len(bits)
    return [min(MAX_BITS, max(MIN_BITS, int(a_target) + int(b) - int(w_target))) for b in bits]


def model_size_bytes(layers: Sequence[Tuple[int, int, int, bool]]) -> int:
    """Storage of the quantized layers in bytes.

    layers: (n_weights, w_bits, n_out_channels, has_bias) per Conv/Linear. Convention:
    - 2..8-bit weights: ceil(n_weights * w_bits / 8) bytes (bit-packed per layer), plus per
      output channel a float32 scale (4 bytes) and a zero point stored in one byte;
    - 16- or 32-bit (float) weights: n_weights * w_bits / 8 bytes, no scale or zero point;
    - bias: float32, 4 bytes per output channel.
    Norm layers and other non-quantized parameters are not counted."""
    total = 0
    for n_weights, w_bits, n_out, has_bias in layers:
        n_weights, w_bits, n_out = int(n_weights), int(w_bits), int(n_out)
        if MIN_BITS <= w_bits <= MAX_BITS:
            total += -(-n_weights * w_bits // 8) + n_out * (4 + 1)
        elif w_bits in (16, 32):
            total += n_weights * w_bits // 8
        else:
            raise ValueError(f"w_bits must be in {MIN_BITS}..{MAX_BITS}, 16 or 32, got {w_bits}")
        if has_bias:
            total += 4 * n_out
    return total


def bits_json(pack_names: Sequence[Sequence[str]], allocation: Allocation,
              act_bits: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The ``bits.json`` artifact (version 1): an ordered list of packs, each with its block
    names, weight bits, activation bits (or null) and weight count, plus prefix/suffix and the
    allocation summary. ``load_bits_json`` reads it back."""
    n = len(allocation.bits)
    if len(pack_names) != n or (act_bits is not None and len(act_bits) != n):
        raise ValueError(f"bits_json: {n} packs but {len(pack_names)} name lists")
    return {
        "version": BITS_JSON_VERSION,
        "policy": allocation.policy,
        "target_bits": allocation.target_bits,
        "candidates": list(allocation.candidates),
        "prefix": {"w_bits": allocation.prefix_bits, "n_weights": allocation.prefix_weights},
        "suffix": {"w_bits": allocation.suffix_bits, "n_weights": allocation.suffix_weights},
        "packs": [
            {
                "blocks": list(names),
                "w_bits": allocation.bits[j],
                "a_bits": None if act_bits is None else int(act_bits[j]),
                "n_weights": allocation.sizes[j],
            }
            for j, names in enumerate(pack_names)
        ],
        "total_bits": allocation.total_bits,
        "avg_bits": allocation.avg_bits,
        "budget_avg_bits": allocation.budget_avg_bits,
        "budget_bits": allocation.budget_bits,
        "cost": allocation.cost,
        "solver": allocation.solver,
    }


def load_bits_json(
    obj: Mapping[str, Any],
) -> Tuple[List[List[str]], Allocation, Optional[List[int]]]:
    """Inverse of ``bits_json``: (pack_names, allocation, act_bits or None)."""
    version = obj.get("version")
    if version != BITS_JSON_VERSION:
        raise ValueError(
            f"bits.json version {version!r} is not supported (expected {BITS_JSON_VERSION})"
        )
    packs = obj["packs"]
    a_bits = [p["a_bits"] for p in packs]
    alloc = Allocation(
        policy=obj["policy"], target_bits=obj["target_bits"],
        candidates=tuple(obj["candidates"]), bits=tuple(p["w_bits"] for p in packs),
        sizes=tuple(p["n_weights"] for p in packs),
        prefix_bits=obj["prefix"]["w_bits"], suffix_bits=obj["suffix"]["w_bits"],
        prefix_weights=obj["prefix"]["n_weights"], suffix_weights=obj["suffix"]["n_weights"],
        total_bits=obj["total_bits"], avg_bits=obj["avg_bits"],
        budget_avg_bits=obj["budget_avg_bits"], budget_bits=obj["budget_bits"], cost=obj["cost"],
        solver=obj["solver"],
    )
    acts = None if any(a is None for a in a_bits) else a_bits
    return [list(p["blocks"]) for p in packs], alloc, acts
