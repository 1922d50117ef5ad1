"""The registered allocators (packptq.mp.allocators): feasibility errors, omega and table costs,
the official greedy rule, none, default candidates, and the behaviour each registry entry
owns."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from packptq.config import ConfigError
from packptq.mp import (ALLOCATORS, Allocator, MPConfig, allocate, boundary_bits, check_feasible,
                        feasible_range, omega_costs, resolve_candidates)


def budget_cfg(**kw):
    return MPConfig(policy="budget", **kw)


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


def test_default_candidates_are_clipped():
    assert resolve_candidates(budget_cfg(), 3) == (2, 3, 4)
    assert resolve_candidates(budget_cfg(), 2) == (2, 3)
    assert resolve_candidates(budget_cfg(), 8) == (7, 8)
    assert resolve_candidates(MPConfig(policy="none"), 5) == (5,)
    with pytest.raises(ConfigError, match="target"):
        resolve_candidates(budget_cfg(), 9)


def test_check_feasible_returns_the_feasible_range():
    sizes, pw, sw = [100, 300], 50, 50
    for cfg in (budget_cfg(avg_bits=3.0), MPConfig(policy="none"),
                MPConfig(policy="official", sensitivity="omega")):
        assert check_feasible(cfg, 3, sizes, pw, sw) == feasible_range(cfg, 3, sizes, pw, sw)
    # official's budget is its own (mid + high) / 2: never checked against the range
    assert check_feasible(MPConfig(policy="official", sensitivity="omega", prefix_bits=8, suffix_bits=8),
                          3, [10], 45, 45) == (7.5, 7.6)


def test_each_registry_entry_owns_its_behaviour():
    entries = {name: ALLOCATORS.get(name) for name in ALLOCATORS.names()}
    assert all(isinstance(a, Allocator) and a.name == name for name, a in entries.items())
    none, budget, official = entries["none"], entries["budget"], entries["official"]
    assert [n for n, a in entries.items() if a.reads_avg_bits] == ["budget"]
    assert [n for n, a in entries.items() if not a.sets_bits] == ["none"]
    assert (none.default_candidates(3), budget.default_candidates(3), official.default_candidates(3)) == \
        ((3,), (2, 3, 4), (3, 4))
    assert (none.default_boundary_bits((3,), 3), budget.default_boundary_bits((2, 3, 4), 3),
            official.default_boundary_bits((3, 4), 3)) == (3, 3, 4)
    kl, om = MPConfig(policy="budget"), MPConfig(policy="budget", sensitivity="omega")
    assert (budget.cost_source(kl), budget.cost_source(om)) == ("kl", "omega")
    assert (budget.needs_omega(kl), budget.needs_omega(om)) == (False, True)
    off = MPConfig(policy="official", sensitivity="omega")
    assert official.needs_omega(off) and official.cost_source(off) is None
    assert budget.budget_avg_bits(kl, (2, 3, 4), 3) == 3.0
    assert budget.budget_avg_bits(MPConfig(policy="budget", avg_bits=2.75), (2, 3, 4), 3) == 2.75
    assert official.budget_avg_bits(off, (3, 4), 3) == 3.5
    assert none.budget_avg_bits(MPConfig(), (3,), 3) is None
    assert MPConfig(policy="official", sensitivity="omega").allocator is official


def test_boundary_bits_take_first_last_bits_before_the_policy_default():
    off = MPConfig(policy="official", sensitivity="omega")
    # official: the boundary modules at the high candidate, whatever quant.first_last_bits says
    assert boundary_bits(off, 3) == (4, 4) and boundary_bits(off, 3, 8) == (4, 4)
    assert boundary_bits(off, 4, 8) == (6, 6)
    assert boundary_bits(dataclasses.replace(off, suffix_bits=6), 3, 8) == (4, 6)
    assert boundary_bits(MPConfig(policy="budget"), 3) == (3, 3)
    assert boundary_bits(MPConfig(policy="budget"), 3, 8) == (8, 8)


# ---------------------------------------------------------------------------------------------
# the official rule, point by point (the official code's quant/mixed_precision.py and
# blocks_packing.py)
# ---------------------------------------------------------------------------------------------
OFF = MPConfig(policy="official", sensitivity="omega")


def test_official_bit_choices_are_the_official_table():
    from packptq.mp import resolve_candidates

    assert [resolve_candidates(OFF, t) for t in (3, 4, 6)] == [(3, 4), (4, 6), (6, 8)]
    for t in (2, 5, 7, 8):
        with pytest.raises(ConfigError, match="bit choices for targets"):
            resolve_candidates(OFF, t)
    assert resolve_candidates(dataclasses.replace(OFF, candidates=[2, 3]), 2) == (2, 3)


def test_official_budget_counts_activations_and_visits_packs_by_score():
    # storage elements per pack: weights + per-sample activations; boundary (prefix 10 weights +
    # 6 activations, suffix 4 + 0) at high = 4 bits; budget (3 + 4) / 2 per element overall
    sizes, acts = [40, 10, 30], ([20, 50, 10], 6, 0)
    # elements: packs 60, 60, 40; boundary 20; total 180 -> budget 3.5 * 180 = 630 bits,
    # packs 630 - 4 * 20 = 550 bits; all at mid: 3 * 160 = 480
    a = allocate(OFF, 3, sizes, omega=[1.0, 3.0, 2.0], prefix_weights=10, suffix_weights=4, acts=acts)
    # highest score first: pack 1 (+60 -> 540 fits), pack 2 (+40 -> 580 does not), pack 0
    # (+60 -> 600 does not): visited in score order, each kept only if it fits
    assert a.bits == (3, 4, 3)
    assert (a.prefix_bits, a.suffix_bits) == (4, 4)
    # the activations change the decision: weights alone (94 elements, packs 273 bits of budget,
    # 240 at mid) upgrade pack 1 only; 100 activations in pack 0, which stays at mid, raise the
    # budget to 623 bits of 540 at mid, and pack 2 fits too
    w_only = allocate(OFF, 3, sizes, omega=[1.0, 3.0, 2.0], prefix_weights=10, suffix_weights=4)
    assert w_only.bits == (3, 4, 3)
    with_acts = allocate(OFF, 3, sizes, omega=[1.0, 3.0, 2.0], prefix_weights=10, suffix_weights=4,
                         acts=([100, 0, 0], 0, 0))
    assert with_acts.bits == (3, 4, 4)


def test_official_skips_a_pack_that_does_not_fit_and_tries_the_next():
    # pack 0 has the top score but is too large; the smaller pack 1 still gets the upgrade
    a = allocate(OFF, 3, [100, 10, 10], omega=[5.0, 4.0, 1.0])
    assert a.bits == (3, 4, 4)
    # ties: the earlier pack first
    assert allocate(OFF, 3, [10, 10, 10], omega=[1.0, 1.0, 1.0]).bits == (4, 3, 3)


def test_uniform_budget_is_the_uniform_models_cost_exactly():
    """mp.budget=uniform: with the first and last layer at 8 bits the target itself (2.0 bits per
    weight) is out of reach, while the uniform model's averages are the budget, met exactly."""
    sizes, pw, sw = [100, 100], 30, 10
    edges = dict(prefix_bits=8, suffix_bits=8)
    with pytest.raises(ConfigError, match="below the smallest reachable average"):
        check_feasible(budget_cfg(**edges), 2, sizes, pw, sw)
    check_feasible(budget_cfg(budget="uniform", **edges), 2, sizes, pw, sw)
    # pack 1 gains much from 4 bits, pack 0 loses little at 2: one bit moves, the totals stay
    cost = [{2: 1.0, 3: 0.9, 4: 0.8}, {2: 9.0, 3: 5.0, 4: 0.1}]
    acts = ([40, 40], 20, 20)
    a = allocate(budget_cfg(budget="uniform", **edges), 3, sizes, cost=cost, prefix_weights=pw,
                 suffix_weights=sw, acts=acts, a_target=3)
    uniform_w = 8 * pw + 8 * sw + 3 * sum(sizes)
    assert a.bits == (2, 4) and a.total_bits == uniform_w
    assert a.budget_avg_bits == pytest.approx(uniform_w / (sum(sizes) + pw + sw))
    same = allocate(MPConfig(policy="none", **edges), 3, sizes, prefix_weights=pw, suffix_weights=sw,
                    acts=acts, a_target=3)  # the uniform model itself
    assert same.bits == (3, 3) and same.total_bits == uniform_w
    assert a.a_budget_avg_bits == pytest.approx(same.a_avg_bits) and a.a_avg_bits == pytest.approx(same.a_avg_bits)
    # an explicit average still wins over either meaning of null
    assert allocate(budget_cfg(budget="uniform", avg_bits=3.0), 3, sizes, cost=cost).budget_avg_bits == 3.0
    with pytest.raises(ConfigError, match="mp.budget=uniform is only read by mp.policy=budget"):
        MPConfig(policy="official", budget="uniform", sensitivity="omega")
    with pytest.raises(ConfigError, match="mp.budget='equal' is unknown"):
        budget_cfg(budget="equal")
