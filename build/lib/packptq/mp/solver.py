"""The exact multiple-choice knapsack behind ``mp.policy=budget``: one bit-width per pack,
minimum summed cost, total bits under a cap. Pure numpy (scipy for the ILP fallback)."""
from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


def budget_bits(avg_bits: float, n_weights: int) -> int:
    """floor(avg_bits * n_weights), with avg_bits read as the decimal it was written as (3.1 is
    31/10, not the nearest double), so a budget of 3.1 bits over 10 weights is 31 bits."""
    return math.floor(Fraction(repr(float(avg_bits))) * n_weights)


def _chain_cost(costs: np.ndarray, idx: Sequence[int]) -> float:
    """sum_j costs[j, idx[j]], added from the last pack to the first, exactly as the DP adds it,
    so equal allocations compare equal to the last bit."""
    total = np.float64(0.0)
    for j in range(len(idx) - 1, -1, -1):
        total = costs[j, idx[j]] + total
    return float(total)


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
