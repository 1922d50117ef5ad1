"""Hessian-guided block importance scores.

Score of block b: with only block b quantized, over the calibration set,
``S_b = E[2 (l(z_q) - l(z_fp) - g.dz)] / E[||dz||^2]`` where ``z`` is the block output,
``dz = z_q - z_fp`` and ``g`` the gradient of the loss ``l`` at ``z_fp``; the expectation runs
over samples, ``||dz||^2`` sums over a sample's elements. For a quadratic ``l`` with Hessian H
and isotropic ``dz`` this is the mean curvature ``tr(H)/n``. ``omega_b = S_b * mean|dz|``.

The loss ``l`` is a registry entry (``SCORE_LOSSES``): it says how to build ``l`` for a batch
and which terms of the ratio it uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

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
    """build(rest, fp_logits, labels, z_q) -> l: the loss of a batch as a function of the block
    output, where ``rest`` runs the FP network from the block's output to the logits.
    terms(z_fp, z_q, l) -> (numerator sum, denominator sum, sum of mean|dz| per sample)."""

    build: Callable[[Callable, torch.Tensor, torch.Tensor, torch.Tensor], LossFn]
    terms: Callable[[torch.Tensor, torch.Tensor, LossFn], tuple]


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


def official_terms(z_fp: torch.Tensor, z_q: torch.Tensor, loss_fn: LossFn) -> tuple:
    """The official code's convention: L = KL against the quantized model's probabilities,
    evaluated and differentiated at z_fp; S = (L - g.(z_fp - z_q)) / mean(0.5 (z_fp - z_q)^2),
    returned as per-batch sums so that num / den reproduces that ratio."""
    z0 = z_fp.detach().requires_grad_(True)
    l0 = loss_fn(z0)
    (g,) = torch.autograd.grad(l0.sum(), z0)
    d = (z_fp - z_q).detach()
    num = (l0.detach() - (g * d).flatten(1).sum(1)).sum()
    den = (0.5 * d.pow(2)).flatten(1).mean(1).sum()
    return float(num), float(den), float(d.abs().flatten(1).mean(1).sum())


SCORE_LOSSES.register("kl")(ScoreLoss(
    build=lambda rest, pb, yb, z_q: (lambda z: kl_per_sample(pb, rest(z))),
    terms=lambda z_fp, z_q, fn: taylor_terms(z_fp, z_q, fn, fp_loss_zero=True)))
SCORE_LOSSES.register("ce")(ScoreLoss(
    build=lambda rest, pb, yb, z_q: (lambda z: F.cross_entropy(rest(z), yb, reduction="none")),
    terms=taylor_terms))


def _official_loss(rest, pb, yb, z_q) -> LossFn:
    with torch.no_grad():
        pq = rest(z_q)
    return lambda z: kl_per_sample(pq, rest(z))


SCORE_LOSSES.register("official")(ScoreLoss(build=_official_loss, terms=official_terms))


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
        num = den = absdz = 0.0
        rest = lambda z: _rest(fp_blocks[b + 1:], fp_split.suffix, z)  # noqa: E731
        for i in range(0, len(h), batch_size):
            hb = h[i:i + batch_size].to(device)
            with torch.no_grad():
                z_fp = fp_blocks[b](hb)
                z_q = q_blocks[b](hb)
            fn = entry.build(rest, fp_logits[i:i + len(hb)].to(device), y[i:i + len(hb)].to(device), z_q)
            with torch.enable_grad():
                n_, d_, a_ = entry.terms(z_fp, z_q, fn)
            num, den, absdz = num + n_, den + d_, absdz + a_
        s = num / max(den, 1e-30)
        S.append(s)
        omega.append(s * absdz / len(h))
        h = forward_all(fp_blocks[b], h, batch_size, device)
    return {"names": fp_split.block_names, "S": S, "omega": omega, "loss": loss}
