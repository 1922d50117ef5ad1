"""Importance scores and packing policies.

The score is checked where its value is known: a quadratic loss of the block output with a
known Hessian H (S must be tr(H)/n for an isotropic perturbation, and exactly
E[dz^T H dz] / E[dz.dz] for any perturbation), and the KL loss through a linear head, whose
Hessian at each sample is W^T (diag(p) - p p^T) W. Packing is checked as a property over many
random score vectors: packs partition the blocks in order and start at the strict running
minima."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from packptq.config import ConfigError
from packptq.packing import PACKING, PackingConfig, block_score, hessian_packs, hessian_scores, make_packs


def spd(n: int, seed: int) -> torch.Tensor:
    """A random symmetric positive-definite matrix with a spread spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64)) @ q.T


def quad_loss(H: torch.Tensor, c: torch.Tensor):
    """l(z) = 0.5 (z - c)^T H (z - c) per sample; z [B, n]."""
    def fn(z):
        d = z - c
        return 0.5 * ((d @ H) * d).sum(-1)
    return fn


def accumulate(z_fp, z_q, fn, loss="ce", bs=256, fp_loss_zero=False):
    num = den = 0.0
    for i in range(0, len(z_fp), bs):
        n_, d_, _, _ = block_score(z_fp[i:i + bs], z_q[i:i + bs], fn, loss, fp_loss_zero)
        num, den = num + n_, den + d_
    return num / den


# ---------------------------------------------------------------------------------------------
# the score on quadratics: exact curvature
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 3.0], ids=["g=0", "g!=0"])
def test_score_recovers_mean_curvature_of_a_quadratic(offset):
    n, N = 12, 4000
    H = spd(n, 0)
    g = torch.Generator().manual_seed(1)
    c = torch.full((n,), offset, dtype=torch.float64)
    z_fp = torch.randn(N, n, generator=g, dtype=torch.float64)
    dz = 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64)  # isotropic
    S = accumulate(z_fp, z_fp + dz, quad_loss(H, c))
    target = float(torch.trace(H)) / n
    assert abs(S - target) <= 0.05 * target, (S, target)
    # for a quadratic the ratio is exact for the perturbation actually drawn
    exact = float(((dz @ H) * dz).sum() / dz.pow(2).sum())
    assert S == pytest.approx(exact, rel=1e-9)


def test_gradient_correction_matters_when_g_is_not_zero():
    # a biased perturbation (as rounding often is) with g != 0: without the g.dz term the
    # estimate would be off by 2 E[g.dz] / E[dz.dz]; with it, it is exact
    n, N = 8, 2000
    H = spd(n, 2)
    gen = torch.Generator().manual_seed(3)
    c = torch.full((n,), -2.0, dtype=torch.float64)
    z_fp = torch.randn(N, n, generator=gen, dtype=torch.float64)
    dz = 0.2 + 0.1 * torch.randn(N, n, generator=gen, dtype=torch.float64)
    fn = quad_loss(H, c)
    S = accumulate(z_fp, z_fp + dz, fn)
    exact = float(((dz @ H) * dz).sum() / dz.pow(2).sum())
    assert S == pytest.approx(exact, rel=1e-9)
    naive = float(2 * (fn(z_fp + dz) - fn(z_fp)).sum() / dz.pow(2).sum())
    assert abs(naive - exact) > 0.5 * abs(exact)


def test_block_score_sums_and_omega_terms():
    z_fp = torch.zeros(3, 2, 2)
    dz = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[0.0] * 2] * 2, [[0.5] * 2] * 2])
    num, den, absdz, per = block_score(z_fp, z_fp + dz, lambda z: z.flatten(1).pow(2).sum(1), "ce")
    # l = |z|^2: H = 2 I, g = 0 at z_fp = 0, so num = 2 |dz|^2
    assert den == pytest.approx(float(dz.pow(2).sum()))
    assert num == pytest.approx(2 * den)
    assert absdz == pytest.approx(float(dz.abs().flatten(1).mean(1).sum()))
    assert per == 4


# ---------------------------------------------------------------------------------------------
# hessian_scores end to end on a split-like toy with a linear head (KL / official losses)
# ---------------------------------------------------------------------------------------------
class Noisy(nn.Module):
    """The 'quantized' block: the FP block plus a small isotropic perturbation."""

    def __init__(self, block: nn.Module, eps: float, seed: int) -> None:
        super().__init__()
        self.block, self.eps = block, eps
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, x):
        z = self.block(x)
        return z + self.eps * torch.randn(z.shape, generator=self.g, dtype=z.dtype)


class Scale(nn.Module):
    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x):
        return self.a * x


def toy_splits(W: torch.Tensor, eps: float = 1e-3):
    blocks = [("b0", nn.Identity()), ("b1", Scale(2.0))]
    fp = SimpleNamespace(prefix=nn.Identity(), blocks=blocks, suffix=lambda z: z @ W.T,
                         block_names=["b0", "b1"])
    fp.forward = lambda x: fp.suffix(blocks[1][1](blocks[0][1](fp.prefix(x))))
    q = SimpleNamespace(prefix=nn.Identity(), blocks=[(n, Noisy(b, eps, i)) for i, (n, b) in enumerate(blocks)],
                        suffix=fp.suffix, block_names=fp.block_names)
    return fp, q


def kl_curvature(W: torch.Tensor, z: torch.Tensor) -> float:
    """Mean over samples of tr(W^T (diag p - p p^T) W) / n at logits z @ W^T."""
    p = F.softmax(z @ W.T, -1)
    WW = (W * W).sum(1)  # ||w_k||^2
    tr = (p * WW).sum(1) - ((p @ W) ** 2).sum(1)
    return float(tr.mean()) / W.shape[1]


def test_hessian_scores_kl_matches_the_softmax_curvature():
    torch.manual_seed(0)
    n, classes, N = 6, 5, 3000
    W = torch.randn(classes, n, dtype=torch.float64)
    x = torch.randn(N, n, dtype=torch.float64)
    y = torch.randint(classes, (N,))
    fp, q = toy_splits(W)
    out = hessian_scores(fp, q, x, y, loss="kl", batch_size=500, progress=False)
    assert out["names"] == ["b0", "b1"] and out["loss"] == "kl"
    # block 1 output z1 = 2x feeds the head directly; block 0's output passes the x2 first
    c1 = kl_curvature(W, 2 * x)
    assert out["S"][1] == pytest.approx(c1, rel=0.05)
    assert out["S"][0] == pytest.approx(4 * c1, rel=0.05)
    # omega = S * mean|dz| (eps * sqrt(2/pi) for Gaussian noise)
    mean_abs = 1e-3 * (2 / torch.pi) ** 0.5
    for s, o in zip(out["S"], out["omega"]):
        assert o == pytest.approx(s * mean_abs, rel=0.05)


def test_official_convention_has_the_opposite_sign():
    # the official code's combination, by our reading: -tr(H) (curvature times -n) for small dz
    torch.manual_seed(1)
    n, classes, N = 6, 4, 2000
    W = torch.randn(classes, n, dtype=torch.float64)
    x = torch.randn(N, n, dtype=torch.float64)
    y = torch.randint(classes, (N,))
    fp, q = toy_splits(W)
    kl = hessian_scores(fp, q, x, y, loss="kl", batch_size=500, progress=False)["S"]
    fp, q = toy_splits(W)
    off = hessian_scores(fp, q, x, y, loss="official", batch_size=500, progress=False)["S"]
    for a, b in zip(kl, off):
        assert b < 0 < a
        assert b / a == pytest.approx(-n, rel=0.1)


def test_ce_score_runs_and_is_positive_for_a_convex_loss():
    torch.manual_seed(2)
    W = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(1000, 6, dtype=torch.float64)
    y = torch.randint(4, (1000,))
    fp, q = toy_splits(W, eps=1e-2)
    S = hessian_scores(fp, q, x, y, loss="ce", batch_size=250, progress=False)["S"]
    # cross-entropy in the logits has the same Hessian as the KL: same curvature, up to noise
    fp, q = toy_splits(W, eps=1e-2)
    S_kl = hessian_scores(fp, q, x, y, loss="kl", batch_size=250, progress=False)["S"]
    for a, b in zip(S, S_kl):
        assert a > 0 and a == pytest.approx(b, rel=0.1)


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
    with pytest.raises(ValueError, match="needs scores"):
        pack("hessian", None)


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
