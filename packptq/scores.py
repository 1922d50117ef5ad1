"""Hessian-guided block importance scores.

Score of block b: with only block b quantized, over the calibration set,
``S_b = E[2 (l(z_q) - l(z_fp) - g.dz)] / E[||dz||^2]`` where ``z`` is the block output,
``dz = z_q - z_fp`` and ``g`` the gradient of the loss ``l`` at ``z_fp``; the expectation runs
over samples, ``||dz||^2`` sums over a sample's elements. For a quadratic ``l`` with Hessian H
and isotropic ``dz`` this is the mean curvature ``tr(H)/n``. ``omega_b = S_b * mean|dz|``.

The score is a registry entry (``SCORE_LOSSES``): ``kl`` (l = KL to the FP output, so l(z_fp) = 0
and g = 0), ``ce`` (cross-entropy with the labels) and ``official``, the official Pack-PTQ code's
formula (``official_batch`` / ``official_finish``), which is positive and grows with the block's
output size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from packptq.evaluate import forward_all, kl_per_sample
from packptq.registry import Registry

#: l(z) per sample [B] for block output z
LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScoreLoss:
    """One way to score a block. ``batch(z_fp, z_q, rest, fp_logits, labels)`` returns the sums
    this score needs over one calibration batch (``rest`` runs the FP network from the block's
    output to the logits); ``finish(sums, n)`` turns the sums over all ``n`` samples into
    (S_b, omega_b)."""

    batch: Callable[[torch.Tensor, torch.Tensor, Callable, torch.Tensor, torch.Tensor], Dict[str, float]]
    finish: Callable[[Dict[str, float], int], Tuple[float, float]]


SCORE_LOSSES: Registry[ScoreLoss] = Registry("score loss")


def taylor_terms(z_fp: torch.Tensor, z_q: torch.Tensor, loss_fn: LossFn, fp_loss_zero: bool = False) -> tuple:
    """Batch sums of the second-order estimate: 2 (l(z_q) - l(z_fp) - g.dz), ||dz||^2 and
    mean|dz| per sample. With ``fp_loss_zero`` (KL to the FP output) l(z_fp) = 0 and g = 0."""
    dz = (z_q - z_fp).detach()
    lq = loss_fn(z_q.detach()).detach()
    if fp_loss_zero:
        num = 2 * lq.sum()
    else:
        z0 = z_fp.detach().requires_grad_(True)
        l0 = loss_fn(z0)
        (g,) = torch.autograd.grad(l0.sum(), z0)
        num = 2 * (lq - l0.detach() - (g * dz).flatten(1).sum(1)).sum()
    return float(num), float(dz.pow(2).flatten(1).sum(1).sum()), float(dz.abs().flatten(1).mean(1).sum())


def taylor_score(name: str, fp_loss_zero: bool = False) -> Callable:
    """Register, as the score ``name``, the second-order expansion of the loss built by the
    function it decorates, ``loss(rest, fp_logits, labels) -> l``:
    S = sum 2 (l(z_q) - l(z_fp) - g.dz) / sum ||dz||^2, omega = S * mean over samples of mean|dz|.
    With ``fp_loss_zero`` (KL to the FP output) l(z_fp) = 0 and g = 0."""

    def make(loss: Callable[[Callable, torch.Tensor, torch.Tensor], LossFn]) -> ScoreLoss:
        def batch(z_fp, z_q, rest, pb, yb):
            num, den, absdz = taylor_terms(z_fp, z_q, loss(rest, pb, yb), fp_loss_zero)
            return {"num": num, "den": den, "absdz": absdz}

        def finish(t, n):
            s = t["num"] / max(t["den"], 1e-30)
            return s, s * t["absdz"] / n

        return ScoreLoss(batch, finish)

    return SCORE_LOSSES.register(name, make=make)


@taylor_score("kl", fp_loss_zero=True)
def _kl(rest, pb, yb) -> LossFn:
    """KL of the FP output distribution to the network's with block output z."""
    return lambda z: kl_per_sample(pb, rest(z))


@taylor_score("ce")
def _ce(rest, pb, yb) -> LossFn:
    """Cross-entropy of the network's output with block output z against the labels."""
    return lambda z: F.cross_entropy(rest(z), yb, reduction="none")


def official_finish(t: Dict[str, float], n: int) -> Tuple[float, float]:
    """S = (L - sum(g*d)/N) / (sum(d*d/2)/N) with L the calibration-set mean of KL(p_q || p_fp)
    and N all output elements of the set; omega = S * sum|d|/N."""
    N = max(int(t["elems"]), 1)
    s = (t["kl"] / n - t["gd"] / N) / max(t["sq"] / N, 1e-12)
    return s, s * t["abs"] / N


@SCORE_LOSSES.register("official", make=lambda batch: ScoreLoss(batch, official_finish))
def official_batch(z_fp, z_q, rest, pb, yb) -> Dict[str, float]:
    """The official code's sums over one batch: the block-quantized model's output distribution
    p_q is the target; ``kl`` is sum over samples of KL(p_q || p_fp); ``g`` is the gradient, with
    respect to the FP block output, of the batch-mean KL(p_q || softmax(rest(z))) at z_fp; with
    d = z_fp - z_q: ``gd`` = sum(g * d), ``sq`` = sum(d * d / 2), ``abs`` = sum|d| and ``elems``
    the number of output elements. ``official_finish`` turns the sums into the score."""
    with torch.no_grad():
        pq = rest(z_q)
    z0 = z_fp.detach().requires_grad_(True)
    batch_kl = kl_per_sample(pq, rest(z0)).mean()
    (g,) = torch.autograd.grad(batch_kl, z0)
    d = (z_fp - z_q).detach().double()
    return {"kl": float(kl_per_sample(pq, pb).double().sum()), "gd": float((g.double() * d).sum()),
            "sq": float(0.5 * d.pow(2).sum()), "abs": float(d.abs().sum()), "elems": d.numel()}


def _rest(blocks: Sequence[nn.Module], suffix: nn.Module, z: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        z = b(z)
    return suffix(z)


def hessian_scores(fp_split, q_split, x: torch.Tensor, y: torch.Tensor, loss: str = "kl",
                   batch_size: int = 64, device: torch.device | None = None, progress: bool = True) -> dict:
    """Importance score S_b and omega_b of every block: only block b quantized (the quantized
    model's block with initialised quantizers), every other part FP. ``x`` [n, ...] calibration
    inputs, ``y`` [n] labels (on the CPU; batches move to ``device``, by default ``x``'s
    device). Returns
    {"S": [...], "omega": [...], "names": [...], "loss": loss}."""
    entry = SCORE_LOSSES.get(loss)
    fp_blocks = [b for _, b in fp_split.blocks]
    device = device if device is not None else x.device
    q_blocks = [b for _, b in q_split.blocks]
    h = forward_all(fp_split.prefix, x, batch_size, device)  # FP input of block 0
    fp_logits = forward_all(fp_split.forward, x, batch_size, device)
    S: List[float] = []
    omega: List[float] = []
    it = tqdm(range(len(fp_blocks)), desc="score blocks", disable=not progress, leave=False)
    for b in it:
        sums: Dict[str, float] = {}
        rest = lambda z: _rest(fp_blocks[b + 1:], fp_split.suffix, z)  # noqa: E731
        for i in range(0, len(h), batch_size):
            hb = h[i:i + batch_size].to(device)
            with torch.no_grad():
                z_fp = fp_blocks[b](hb)
                z_q = q_blocks[b](hb)
            with torch.enable_grad():
                part = entry.batch(z_fp, z_q, rest, fp_logits[i:i + len(hb)].to(device), y[i:i + len(hb)].to(device))
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        s, o = entry.finish(sums, len(h))
        S.append(s)
        omega.append(o)
        h = forward_all(fp_blocks[b], h, batch_size, device)
    return {"names": fp_split.block_names, "S": S, "omega": omega, "loss": loss}


@dataclass(frozen=True)
class Scores:
    """The score phase's output: block ``names``, S_b and omega_b per block, the score ``loss``."""

    names: List[str]
    S: List[float]
    omega: List[float]
    loss: str


def run(ctx, loss: str, twins, x: torch.Tensor, y: torch.Tensor) -> Scores:
    """The score phase (``ctx``: the run's ``context.RunContext``; ``twins``: ``twins.Twins``):
    ``hessian_scores`` of every block with ``loss`` (``packing.loss``) on the calibration
    inputs ``x`` and labels ``y``, written to ``scores.json`` once and read back on resume."""
    with ctx.phase("score"):
        rec = ctx.rd.cached_json("scores.json", lambda: hessian_scores(
            twins.fsplit, twins.qsplit, x, y, loss, batch_size=ctx.batch_size, device=ctx.device,
            progress=ctx.progress))
        s = Scores(rec["names"], rec["S"], rec["omega"], rec["loss"])
        ctx.log_table("packing/scores", ["block", "S", "omega"], [list(r) for r in zip(s.names, s.S, s.omega)])
    return s
