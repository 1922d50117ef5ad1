"""The exact budget solver (packptq.mp.solver, through mp.policy=budget): against brute force and
a dense DP, the ILP fallback, model-sized problems, the tie rule and the decimal reading of
avg_bits."""
from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from packptq.mp import MPConfig, allocate, budget_bits, feasible_range, solve_mckp


# -- references -------------------------------------------------------------------------------
def brute_force(sizes, candidates, costs, capacity):
    """Lexicographically smallest bits vector among the minimum-cost feasible ones."""
    best = None
    for ks in itertools.product(range(len(candidates)), repeat=len(sizes)):
        used = sum(s * candidates[k] for s, k in zip(sizes, ks))
        if used > capacity:
            continue
        key = (math.fsum(costs[j][k] for j, k in enumerate(ks)), ks)
        if best is None or key < best:
            best = key
    return list(best[1]), best[0]


def dense_dp(sizes, candidates, costs, capacity):
    """Textbook dense DP over total bits (no gcd, no pruning), lexicographic ties."""
    n, K = len(sizes), len(candidates)
    w = [[sizes[j] * candidates[k] for k in range(K)] for j in range(n)]
    V = np.zeros((n + 1, capacity + 1))
    for j in range(n - 1, -1, -1):
        V[j] = np.inf
        for k in range(K):
            shifted = np.full(capacity + 1, np.inf)
            shifted[w[j][k]:] = costs[j][k] + V[j + 1][: capacity + 1 - w[j][k]]
            V[j] = np.minimum(V[j], shifted)
    x, choice = capacity, []
    for j in range(n):
        for k in range(K):
            if w[j][k] <= x and costs[j][k] + V[j + 1][x - w[j][k]] == V[j][x]:
                choice.append(k)
                x -= w[j][k]
                break
    return choice, float(V[0][capacity])


def random_costs(rng, n, K, integer):
    """Sensitivities decreasing (non-strictly for integer costs) in bits: [n, K]."""
    if integer:
        steps = rng.integers(0, 3, size=(n, K))
    else:
        steps = rng.random((n, K))
    return np.cumsum(steps, axis=1)[:, ::-1].astype(np.float64)


def budget_cfg(**kw):
    return MPConfig(policy="budget", **kw)


# -- the budget allocator -----------------------------------------------------------------------
def test_budget_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    n_ties = 0
    for it in range(200):
        n = int(rng.integers(2, 7))
        K = int(rng.integers(2, 4))
        candidates = sorted(int(b) for b in rng.choice(np.arange(2, 9), size=K, replace=False))
        target = candidates[len(candidates) // 2]
        sizes = [int(s) for s in rng.integers(1, 60, size=n)]
        if it % 4 == 0:  # a shared factor exercises the gcd reduction
            sizes = [s * 96 for s in sizes]
        costs = random_costs(rng, n, K, integer=it % 2 == 0)
        pw, sw = int(rng.integers(0, 40)), int(rng.integers(0, 40))
        cfg0 = budget_cfg(candidates=candidates, prefix_bits=int(rng.integers(2, 9)),
                          suffix_bits=int(rng.integers(2, 9)))
        lo, hi = feasible_range(cfg0, target, sizes, pw, sw)
        avg = round(float(rng.uniform(lo, hi)), 3)
        avg = min(max(avg, math.ceil(lo * 1000) / 1000), math.floor(hi * 1000) / 1000)
        cfg = dataclasses.replace(cfg0, avg_bits=avg)
        table = [{b: costs[j][k] for k, b in enumerate(candidates)} for j in range(n)]

        a = allocate(cfg, target, sizes, cost=table, prefix_weights=pw, suffix_weights=sw)

        n_weights = sum(sizes) + pw + sw
        cap = math.floor(Fraction(str(avg)) * n_weights)
        fixed = cfg.prefix_bits * pw + cfg.suffix_bits * sw
        ref_k, ref_cost = brute_force(sizes, candidates, costs, cap - fixed)
        assert list(a.bits) == [candidates[k] for k in ref_k], (it, a, ref_k)
        assert a.cost == pytest.approx(ref_cost, rel=1e-12, abs=1e-12)
        assert a.solver == "dp"
        assert a.budget_bits == cap
        assert a.total_bits <= cap and a.avg_bits <= avg
        assert a.total_bits == fixed + sum(s * b for s, b in zip(sizes, a.bits))
        assert a.avg_bits == a.total_bits / n_weights
        n_ties += sum(1 for ks in itertools.product(range(K), repeat=n)
                      if sum(sizes[j] * candidates[k] for j, k in enumerate(ks)) <= cap - fixed
                      and math.fsum(costs[j][k] for j, k in enumerate(ks)) == ref_cost) > 1
    assert n_ties > 20  # the integer-cost half really exercises the tie rule


def test_budget_with_millions_of_weights_per_pack():
    rng = np.random.default_rng(1)
    for _ in range(12):
        n = int(rng.integers(5, 9))
        sizes = [int(s) for s in rng.integers(100_000, 7_000_000, size=n)]  # gcd 1 in practice
        candidates = [2, 3, 4]
        costs = random_costs(rng, n, 3, integer=False)
        cap = int(sum(sizes) * rng.uniform(2.2, 3.8))
        sol = solve_mckp(sizes, candidates, costs, cap)
        ref_k, ref_cost = brute_force(sizes, candidates, costs, cap)
        assert sol.choice == ref_k and sol.solver == "dp"
        assert sol.cost == pytest.approx(ref_cost, rel=1e-12)


def test_sparse_dp_equals_dense_dp_on_larger_instances():
    rng = np.random.default_rng(2)
    for it in range(25):
        n = int(rng.integers(8, 15))
        K = int(rng.integers(3, 5))
        candidates = list(range(2, 2 + K))
        sizes = [int(s) for s in rng.integers(1, 30, size=n)]
        costs = random_costs(rng, n, K, integer=it % 2 == 0)
        cap = int(rng.integers(2 * sum(sizes), (1 + K) * sum(sizes)))
        sol = solve_mckp(sizes, candidates, costs, cap)
        ref_k, ref_cost = dense_dp(sizes, candidates, costs, cap)
        assert sol.choice == ref_k
        assert sol.cost == ref_cost


def test_milp_fallback_is_optimal_and_within_budget():
    rng = np.random.default_rng(3)
    for _ in range(15):
        n = int(rng.integers(3, 7))
        sizes = [int(s) for s in rng.integers(1_000, 100_000, size=n)]
        candidates = [2, 3, 4]
        costs = random_costs(rng, n, 3, integer=False)
        cap = int(sum(sizes) * rng.uniform(2.2, 3.8))
        sol = solve_mckp(sizes, candidates, costs, cap, max_states=1)  # force the fallback
        assert sol.solver == "milp"
        assert sum(s * candidates[k] for s, k in zip(sizes, sol.choice)) <= cap
        _, ref_cost = brute_force(sizes, candidates, costs, cap)
        assert sol.cost == pytest.approx(ref_cost, rel=1e-6)


def test_budget_solves_a_model_sized_problem_with_the_dp():
    """50 packs of 0.1M-7M weights: the exact DP handles it (no fallback), within the budget."""
    rng = np.random.default_rng(4)
    sizes = rng.integers(100_000, 7_000_000, size=50)
    costs = random_costs(rng, 50, 3, integer=False) * rng.random((50, 1))
    a = allocate(budget_cfg(avg_bits=3.0), 3, sizes, cost=[dict(zip((2, 3, 4), c)) for c in costs],
                 prefix_weights=9_408, suffix_weights=512_000)
    assert a.solver == "dp" and a.avg_bits <= 3.0


def test_ties_prefer_fewer_bits_in_earlier_packs_and_repeat():
    # equal sensitivities at every bit-width: nothing to gain, every pack at the lowest bits
    flat = [{2: 1.0, 3: 1.0, 4: 1.0}] * 3
    a = allocate(budget_cfg(), 3, [10, 10, 10], cost=flat)
    assert a.bits == (2, 2, 2)
    # two identical packs, room to upgrade exactly one: the later pack gets it
    sym = [{2: 1.0, 3: 0.0}] * 2
    cfg = budget_cfg(candidates=[2, 3], avg_bits=2.5)
    first = allocate(cfg, 3, [8, 8], cost=sym)
    assert first.bits == (2, 3) and first.cost == 1.0
    for _ in range(5):
        assert allocate(cfg, 3, [8, 8], cost=sym) == first


def test_budget_reads_avg_bits_as_written():
    assert budget_bits(3.1, 10) == 31 and budget_bits(3.0, 7) == 21 and budget_bits(2.95, 20) == 59
    a = allocate(budget_cfg(avg_bits=3.1, candidates=[3, 4]), 3, [1] * 10,
                 cost=[{3: 1.0, 4: 0.0}] * 10)
    assert a.total_bits == 31 and a.bits == (3,) * 9 + (4,)


def test_two_budgets_equal_brute_force():
    """Weights and activations each under a budget: the MILP answer is the brute-force optimum."""
    import itertools

    from packptq.mp.solver import solve_mckp_multi

    rng = np.random.default_rng(3)
    for _ in range(20):
        n, cand = int(rng.integers(2, 6)), [2, 3, 4]
        w = rng.integers(1, 50, n)
        a = rng.integers(1, 50, n)
        costs = rng.random((n, 3)) * np.array([4.0, 2.0, 1.0])
        w_use = np.outer(w, cand)
        a_use = np.outer(a, cand)
        caps = [int(3 * w.sum()), int(3 * a.sum())]
        best = min((sum(costs[j, k] for j, k in enumerate(ch)), ch) for ch in itertools.product(range(3), repeat=n)
                   if sum(w_use[j, k] for j, k in enumerate(ch)) <= caps[0]
                   and sum(a_use[j, k] for j, k in enumerate(ch)) <= caps[1])
        sol = solve_mckp_multi(costs, [w_use, a_use], caps)
        assert sol.cost == pytest.approx(best[0], rel=1e-9)
        assert sum(w_use[j, k] for j, k in enumerate(sol.choice)) <= caps[0]
        assert sum(a_use[j, k] for j, k in enumerate(sol.choice)) <= caps[1]
