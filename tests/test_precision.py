"""Bit allocation (packptq.precision): the exact budget solver against brute force, tie rules,
feasibility errors, the official greedy rule, accounting, bits.json and the mp configs."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from packptq.config import ConfigError, typed
from packptq.precision import (
    ALLOCATORS,
    MPConfig,
    act_bits,
    allocate,
    avg_act_bits,
    avg_weight_bits,
    bits_json,
    boundary_bits,
    budget_bits,
    check_feasible,
    feasible_range,
    load_bits_json,
    model_size_bytes,
    omega_costs,
    resolve_candidates,
    solve_mckp,
)

CONF_MP = Path(__file__).resolve().parents[1] / "conf" / "mp"


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


def test_infeasible_budget_raises_with_the_feasible_range():
    sizes, pw, sw = [100, 300], 50, 50  # prefix/suffix at the 3-bit target
    assert feasible_range(budget_cfg(), 3, sizes, pw, sw) == pytest.approx((1100 / 500, 1900 / 500))
    for avg in (2.0, 4.0):
        cfg = budget_cfg(avg_bits=avg)
        expected = r"feasible range of mp.avg_bits is \[2.2000, 3.8000\]"
        with pytest.raises(ConfigError, match=expected):
            check_feasible(cfg, 3, sizes, pw, sw)  # cheap: no cost table needed
        with pytest.raises(ConfigError, match="feasible range"):
            allocate(cfg, 3, sizes, cost=[{2: 1.0, 3: 0.5, 4: 0.0}] * 2,
                     prefix_weights=pw, suffix_weights=sw)
    for avg in (2.2, 3.8):  # the ends are feasible
        check_feasible(budget_cfg(avg_bits=avg), 3, sizes, pw, sw)
    check_feasible(MPConfig(policy="none"), 3, sizes, pw, sw)  # no budget, nothing to check


def test_budget_reads_avg_bits_as_written():
    assert budget_bits(3.1, 10) == 31 and budget_bits(3.0, 7) == 21 and budget_bits(2.95, 20) == 59
    a = allocate(budget_cfg(avg_bits=3.1, candidates=[3, 4]), 3, [1] * 10,
                 cost=[{3: 1.0, 4: 0.0}] * 10)
    assert a.total_bits == 31 and a.bits == (3,) * 9 + (4,)


def test_omega_sensitivity_builds_the_cost_from_omega():
    table = omega_costs([1.0, 2.0], [2, 3, 4], 3)
    np.testing.assert_allclose(table, [[4.0, 1.0, 0.25], [8.0, 2.0, 0.5]])
    cfg = budget_cfg(sensitivity="omega")
    assert allocate(cfg, 3, [10, 10], omega=[1.0, 2.0]).bits == (3, 3)  # 1 + 2 < 4 + 0.5
    # a bit moves from pack 0 (3 -> 2 costs 3 * omega_0) to pack 1 (3 -> 4 saves 0.75 * omega_1)
    # only when omega_1 > 4 * omega_0
    a = allocate(cfg, 3, [10, 10], omega=[1.0, 5.0])
    assert a.bits == (2, 4) and a.cost == pytest.approx(4.0 + 1.25)
    with pytest.raises(ValueError, match="omega"):
        allocate(cfg, 3, [10, 10], cost=[{2: 1, 3: 1, 4: 1}] * 2)


def test_cost_inputs_agree_and_fail_loudly():
    rows = [{2: 3.0, 3: 1.0, 4: 0.5}, {2: 5.0, 3: 2.0, 4: 0.1}]
    by_bits = np.zeros((2, 9))
    for j, row in enumerate(rows):
        for b, c in row.items():
            by_bits[j, b] = c
    cfg = budget_cfg(avg_bits=3.0)
    a = allocate(cfg, 3, [10, 20], cost=rows)
    assert allocate(cfg, 3, [10, 20], cost=lambda j, b: rows[j][b]) == a
    assert allocate(cfg, 3, [10, 20], cost=by_bits) == a
    with pytest.raises(ValueError, match=r"cost\[pack\]\[bits\]"):
        allocate(cfg, 3, [10, 20], cost=[{2: 1.0, 3: 1.0}] * 2)
    with pytest.raises(ValueError, match="needs a cost table"):
        allocate(cfg, 3, [10, 20])
    with pytest.raises(ValueError, match="non-finite"):
        allocate(cfg, 3, [10, 20], cost=[{2: np.nan, 3: 1.0, 4: 0.0}] * 2)


# -- official and none -----------------------------------------------------------------------
def test_official_rule_on_a_hand_made_example():
    cfg = MPConfig(policy="official", sensitivity="omega")
    assert resolve_candidates(cfg, 3) == (3, 4) and boundary_bits(cfg, 3) == (4, 4)
    # 90 pack weights + 10 boundary weights at 4 bits; budget 3.5 * 100 = 350 bits.
    # start: 3*90 + 4*10 = 310. Order by omega: pack 3 (+36 -> 346, upgrade), pack 1 (+20 -> 366,
    # skip), pack 2 (+30, skip), pack 0 (+4 -> 350 <= 350, upgrade).
    a = allocate(cfg, 3, [4, 20, 30, 36], omega=[0.1, 0.5, 0.3, 0.9],
                 prefix_weights=5, suffix_weights=5)
    assert a.bits == (4, 3, 3, 4)
    assert a.total_bits == 350 and a.avg_bits == 3.5 <= 3.5
    assert a.budget_avg_bits == 3.5 and a.budget_bits == 350 and a.solver is None
    # cost reported with the omega model: omega_j * 4**(3 - b)
    assert a.cost == pytest.approx(0.1 / 4 + 0.5 + 0.3 + 0.9 / 4)
    # equal omega: the earlier pack is upgraded first
    b = allocate(cfg, 3, [10, 10, 10], omega=[1.0, 1.0, 1.0])
    assert b.bits == (4, 3, 3) and b.avg_bits <= 3.5
    # two explicit candidates replace (target, target+1)
    c = allocate(dataclasses.replace(cfg, candidates=[6, 4]), 4, [10, 10], omega=[0.0, 1.0])
    assert c.candidates == (4, 6) and c.bits == (4, 6) and c.avg_bits == 5.0
    with pytest.raises(ConfigError, match="candidates"):
        allocate(cfg, 8, [10], omega=[1.0])
    with pytest.raises(ValueError, match="omega"):
        allocate(cfg, 3, [10])


def test_none_gives_the_target():
    cfg = MPConfig(policy="none")
    a = allocate(cfg, 4, [7, 9, 11], prefix_weights=3, suffix_weights=5)
    assert a.bits == (4, 4, 4) and a.avg_bits == 4.0 and a.budget_bits is None
    assert feasible_range(cfg, 4, [7, 9, 11], 3, 5) == (4.0, 4.0)
    # boundary layers at 8 bits raise the honest average
    a8 = allocate(dataclasses.replace(cfg, prefix_bits=8, suffix_bits=8), 4, [10], prefix_weights=5,
                  suffix_weights=5)
    assert a8.avg_bits == 6.0
    assert sorted(ALLOCATORS.names()) == ["budget", "none", "official"]


# -- accounting and bits.json -------------------------------------------------------------------
def test_accounting_on_a_hand_computed_example():
    assert avg_weight_bits([10, 30], [2, 4]) == 3.5
    assert avg_act_bits([1000, 3000, 4000], [8, 4, 2]) == (8000 + 12000 + 8000) / 8000
    layers = [
        (100, 3, 4, True),   # ceil(300/8)=38 + 4*(4 scale + 1 zp) + 4*4 bias = 74
        (10, 8, 2, False),   # 10 + 2*5 = 20
        (50, 32, 5, True),   # float: 200 + 20 bias = 220
    ]
    assert model_size_bytes(layers) == 74 + 20 + 220
    with pytest.raises(ValueError):
        model_size_bytes([(10, 12, 1, False)])
    with pytest.raises(ValueError):
        avg_weight_bits([1, 2], [3])
    follow, fixed = MPConfig(acts="follow"), MPConfig(acts="fixed")
    assert act_bits(follow, 3, 3, [2, 3, 4]) == [2, 3, 4]
    assert act_bits(follow, 4, 8, [3, 4, 5]) == [7, 8, 8]
    assert act_bits(fixed, 3, 4, [2, 3, 4]) == [4, 4, 4]


def test_bits_json_roundtrip():
    a = allocate(budget_cfg(avg_bits=3.0), 3, [10, 20], cost=[{2: 3.0, 3: 1.0, 4: 0.5}] * 2,
                 prefix_weights=4, suffix_weights=6)
    names = [["blocks.0", "blocks.1"], ["blocks.2"]]
    acts = act_bits(MPConfig(), 3, 3, a.bits)
    d = json.loads(json.dumps(bits_json(names, a, acts)))
    assert d["version"] == 1
    assert [p["w_bits"] for p in d["packs"]] == list(a.bits)
    assert d["avg_bits"] == a.avg_bits and d["solver"] == "dp"
    names2, a2, acts2 = load_bits_json(d)
    assert names2 == names and a2 == a and acts2 == acts
    assert a.summary()["n_weights"] == 40
    with pytest.raises(ValueError, match="version"):
        load_bits_json({**d, "version": 2})


# -- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONF_MP.glob("*.yaml")), ids=lambda p: p.stem)
def test_mp_yaml_composes(path):
    section = OmegaConf.load(path)
    assert set(section.keys()) == {f.name for f in dataclasses.fields(MPConfig)}
    cfg = typed(MPConfig, section, "mp")
    assert cfg.policy == path.stem


def test_every_policy_has_a_yaml():
    assert sorted(p.stem for p in CONF_MP.glob("*.yaml")) == ALLOCATORS.names()


@pytest.mark.parametrize(
    "override, match",
    [
        ({"policy": "greedy"}, "known: budget, none, official"),
        ({"policy": "budget", "avg_bits": 9.0}, "avg_bits"),
        ({"policy": "none", "avg_bits": 3.0}, "only used by mp.policy=budget"),
        ({"policy": "budget", "candidates": [1, 2]}, "2..8"),
        ({"policy": "budget", "candidates": [3, 3]}, "duplicates"),
        ({"policy": "budget", "candidates": []}, "non-empty"),
        ({"policy": "none", "candidates": [3, 4]}, "unused"),
        ({"policy": "official", "sensitivity": "omega", "candidates": [2, 3, 4]}, "exactly two"),
        ({"policy": "official", "sensitivity": "kl"}, "sensitivity=omega"),
        ({"policy": "official", "sensitivity": "omega", "avg_bits": 3.5}, "avg_bits"),
        ({"sensitivity": "mse"}, "sensitivity"),
        ({"acts": "half"}, "acts"),
        ({"prefix_bits": 9}, "prefix_bits"),
        ({"avg_bit": 3.0}, "avg_bit"),  # typo: strict schema
        ({"candidates": "3"}, "mp"),    # wrong type
    ],
)
def test_bad_mp_config_raises(override, match):
    with pytest.raises(ConfigError, match=match):
        typed(MPConfig, override, "mp")


def test_default_candidates_are_clipped():
    assert resolve_candidates(budget_cfg(), 3) == (2, 3, 4)
    assert resolve_candidates(budget_cfg(), 2) == (2, 3)
    assert resolve_candidates(budget_cfg(), 8) == (7, 8)
    assert resolve_candidates(MPConfig(policy="none"), 5) == (5,)
    with pytest.raises(ConfigError, match="target"):
        resolve_candidates(budget_cfg(), 9)
