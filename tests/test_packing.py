"""Packing policies (packptq/packing.py), checked as a property over many random score vectors:
packs partition the blocks in order and Hessian packs start at the strict running minima; each
registered policy states what it needs and what its units are."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packptq.config import ConfigError
from packptq.packing import PACKING, PackingConfig, hessian_packs, make_packs


# ---------------------------------------------------------------------------------------------
# adaptive (Hessian) packing: a property over many score vectors
# ---------------------------------------------------------------------------------------------
def strict_running_minima(scores):
    out, best = [], float("inf")
    for i, s in enumerate(scores):
        if s < best:
            out.append(i)
            best = s
    return out


def check_partition(packs, n):
    assert [i for p in packs for i in p] == list(range(n))  # every block once, in order
    for p in packs:
        assert p and p == list(range(p[0], p[-1] + 1))  # contiguous, non-empty


@settings(max_examples=300, deadline=None, database=None)  # no .hypothesis/ in the repo
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30))  # small ints: many ties
def test_hessian_packs_start_at_strict_running_minima(scores):
    packs = hessian_packs([float(s) for s in scores])
    check_partition(packs, len(scores))
    assert [p[0] for p in packs] == strict_running_minima(scores)


def test_hessian_packs_random_floats_and_examples():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 40)
        s = [rng.random() for _ in range(n)]
        packs = hessian_packs(s)
        check_partition(packs, n)
        assert [p[0] for p in packs] == strict_running_minima(s)
    assert hessian_packs([3, 1, 2, 0.5, 4]) == [[0], [1, 2], [3, 4]]
    assert hessian_packs([1, 2, 3]) == [[0, 1, 2]]  # increasing: one pack
    assert hessian_packs([3, 2, 1]) == [[0], [1], [2]]  # decreasing: one block each
    assert hessian_packs([]) == []


# ---------------------------------------------------------------------------------------------
# the other policies
# ---------------------------------------------------------------------------------------------
NAMES = [f"b{i}" for i in range(9)]


def pack(policy, scores=None, seed=0, **kw):
    return make_packs(PackingConfig(policy=policy, **kw), NAMES, scores, seed)


def test_block_layer_net_none():
    assert pack("block") == [[i] for i in range(9)]
    assert pack("layer") == [[i] for i in range(9)]  # the pipeline splits blocks into layers
    assert pack("net") == [list(range(9))]
    assert pack("none") == []


@pytest.mark.parametrize("size", [1, 2, 4, 9, 20])
def test_fixed(size):
    packs = pack("fixed", size=size)
    check_partition(packs, 9)
    assert all(len(p) == size for p in packs[:-1]) and 1 <= len(packs[-1]) <= size


def test_random_has_the_hessian_size_histogram_and_is_seeded():
    rng = random.Random(1)
    differs = 0
    for trial in range(50):
        s = [rng.random() for _ in NAMES]
        h = sorted(len(p) for p in hessian_packs(s))
        a = pack("random", s, seed=trial)
        check_partition(a, 9)
        assert sorted(len(p) for p in a) == h
        assert a == pack("random", s, seed=trial)  # reproducible
        fixed = PackingConfig(policy="random", seed=7)  # packing.seed wins over the run seed
        assert make_packs(fixed, NAMES, s, 123) == make_packs(fixed, NAMES, s, 0)
        differs += any(pack("random", s, seed=k) != a for k in range(trial + 1, trial + 6))
    assert differs > 25  # the seed changes the order when the sizes are not all equal


def test_hessian_policy_needs_scores():
    assert PackingConfig(policy="hessian").needs_scores and PackingConfig(policy="random").needs_scores
    assert not PackingConfig(policy="block").needs_scores
    with pytest.raises(ValueError, match="needs block scores"):
        pack("hessian", None)


@pytest.mark.parametrize("policy,units,needs", [("none", "none", False), ("layer", "layers", False),
                                                ("block", "packs", False), ("hessian", "packs", True),
                                                ("random", "packs", True), ("net", "packs", False)])
def test_each_policy_states_its_units_and_needs(policy, units, needs):
    entry = PACKING.get(policy)
    assert (entry.units, entry.needs_scores) == (units, needs)


def test_manual_validates_names_and_order():
    cfg = lambda packs: PackingConfig(policy="manual", packs=packs)  # noqa: E731
    good = [NAMES[:3], NAMES[3:4], NAMES[4:]]
    assert make_packs(cfg(good), NAMES, None, 0) == [[0, 1, 2], [3], [4, 5, 6, 7, 8]]
    with pytest.raises(ConfigError, match=r"unknown blocks \['b99'\]"):
        make_packs(cfg([NAMES[:3], ["b99"], NAMES[3:]]), NAMES, None, 0)
    with pytest.raises(ConfigError, match="every block exactly once"):
        make_packs(cfg([NAMES[:3], NAMES[4:]]), NAMES, None, 0)  # b3 missing
    with pytest.raises(ConfigError, match="every block exactly once"):
        make_packs(cfg([NAMES[3:], NAMES[:3]]), NAMES, None, 0)  # out of order
    with pytest.raises(ConfigError, match="every block exactly once"):
        make_packs(cfg([NAMES[:4], NAMES[3:]]), NAMES, None, 0)  # b3 twice
    with pytest.raises(ConfigError, match="needs packing.packs"):
        PackingConfig(policy="manual")


def test_unknown_policy_and_loss_list_the_known_ones():
    with pytest.raises(ConfigError) as exc:
        PackingConfig(policy="greedy")
    for name in PACKING.names():
        assert name in str(exc.value)
    assert {"hessian", "block", "layer", "net", "fixed", "random", "manual", "none"} <= set(PACKING.names())
    with pytest.raises(ConfigError, match="kl"):
        PackingConfig(loss="mse")
    with pytest.raises(ConfigError, match="size"):
        PackingConfig(policy="fixed", size=0)


def test_options_a_policy_ignores_are_reported():
    assert PackingConfig(policy="block", size=3).unused_options(False) == ["size"]
    assert PackingConfig(policy="fixed", size=3).unused_options(False) == []
    assert PackingConfig(policy="random", seed=4).unused_options(True) == []
    assert PackingConfig(policy="hessian", seed=4).unused_options(True) == ["seed"]
    # the score loss matters whenever scores are computed (packing's or mixed precision's need)
    assert PackingConfig(policy="block", loss="official").unused_options(False) == ["loss"]
    assert PackingConfig(policy="block", loss="official").unused_options(True) == []
