"""Hessian-guided block importance scores (packptq/scores.py), checked where the value is known:
a quadratic loss of the block output with a known Hessian H (S must be tr(H)/n for an isotropic
perturbation, and exactly E[dz^T H dz] / E[dz.dz] for any perturbation), and the KL loss through
a linear head, whose Hessian at each sample is W^T (diag(p) - p p^T) W."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from packptq.scores import SCORE_LOSSES, hessian_scores, taylor_terms


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
        n_, d_, _ = taylor_terms(z_fp[i:i + bs], z_q[i:i + bs], fn, fp_loss_zero)
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


def test_taylor_terms_sums_and_omega_terms():
    z_fp = torch.zeros(3, 2, 2)
    dz = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[0.0] * 2] * 2, [[0.5] * 2] * 2])
    num, den, absdz = taylor_terms(z_fp, z_fp + dz, lambda z: z.flatten(1).pow(2).sum(1))
    # l = |z|^2: H = 2 I, g = 0 at z_fp = 0, so num = 2 |dz|^2
    assert den == pytest.approx(float(dz.pow(2).sum()))
    assert num == pytest.approx(2 * den)
    assert absdz == pytest.approx(float(dz.abs().flatten(1).mean(1).sum()))


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


class Rounded(nn.Module):
    """A deterministic 'quantized' block: the FP block's output rounded to a grid of ``step``."""

    def __init__(self, block: nn.Module, step: float) -> None:
        super().__init__()
        self.block, self.step = block, step

    def forward(self, x):
        return torch.round(self.block(x) / self.step) * self.step


def official_reference(fp_blocks, q_blocks, head, x, bs):
    """The official Pack-PTQ formula written out directly, one block quantized at a time: L from
    F.kl_div over the whole set (batch mean), g from F.kl_div per batch (batch mean) by autograd
    through the network, d = z_fp - z_q, N = all output elements."""
    def run(z, b_q):
        outs = []
        for k, blk in enumerate(fp_blocks):
            z = (q_blocks[k] if k == b_q else blk)(z)
            outs.append(z)
        return head(z), outs

    S, omega = [], []
    for b in range(len(fp_blocks)):
        with torch.no_grad():
            pred_q, _ = run(x, b)
            fp_pred, _ = run(x, None)
        L = F.kl_div(F.log_softmax(fp_pred, -1), F.softmax(pred_q, -1), reduction="batchmean")
        gd = sq = ab = 0.0
        N = 0
        for i in range(0, len(x), bs):
            xb = x[i:i + bs]
            with torch.no_grad():
                teacher, q_outs = run(xb, b)
            z = xb
            for k in range(b + 1):
                z = fp_blocks[k](z)
            z_fp = z.detach().requires_grad_(True)
            y = z_fp
            for blk in fp_blocks[b + 1:]:
                y = blk(y)
            loss = F.kl_div(F.log_softmax(head(y), -1), F.softmax(teacher, -1), reduction="batchmean")
            (g,) = torch.autograd.grad(loss, z_fp)
            d = z_fp.detach() - q_outs[b]
            gd += float((g * d).sum())
            sq += float((0.5 * d * d).sum())
            ab += float(d.abs().sum())
            N += d.numel()
        s = (float(L) - gd / N) / (sq / N)
        S.append(s)
        omega.append(s * ab / N)
    return S, omega


def test_official_score_is_the_official_formula():
    torch.manual_seed(1)
    n, classes, N = 6, 4, 600
    fp_blocks = [nn.Sequential(nn.Linear(n, n), nn.Tanh()).double() for _ in range(3)]
    q_blocks = [Rounded(blk, 0.05) for blk in fp_blocks]
    W = torch.randn(classes, n, dtype=torch.float64)
    head = lambda z: z @ W.T  # noqa: E731
    x = torch.randn(N, n, dtype=torch.float64)
    y = torch.randint(classes, (N,))
    fp = SimpleNamespace(prefix=nn.Identity(), blocks=[(f"b{k}", m) for k, m in enumerate(fp_blocks)],
                         suffix=head, block_names=["b0", "b1", "b2"])
    fp.forward = lambda z: head(fp_blocks[2](fp_blocks[1](fp_blocks[0](z))))
    q = SimpleNamespace(prefix=nn.Identity(), blocks=[(f"b{k}", m) for k, m in enumerate(q_blocks)],
                        suffix=head, block_names=fp.block_names)
    out = hessian_scores(fp, q, x, y, loss="official", batch_size=150, progress=False)
    S_ref, omega_ref = official_reference(fp_blocks, q_blocks, head, x, 150)
    assert out["S"] == pytest.approx(S_ref, rel=1e-6)
    assert out["omega"] == pytest.approx(omega_ref, rel=1e-6)
    # positive, and n_b (outputs per sample, 6 here) times the per-element curvature of the kl
    # score: its correction term is divided by all N elements, so it barely moves it (measured
    # ratios 5.98-5.99)
    kl = hessian_scores(fp, q, x, y, loss="kl", batch_size=150, progress=False)["S"]
    for a, b in zip(kl, out["S"]):
        assert a > 0 and b > 0
        assert b / a == pytest.approx(n, rel=0.02)


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
