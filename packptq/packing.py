"""Hessian-guided block importance scores and the packing policies.

Score of block b (DESIGN.md §1): with only block b quantized, over the calibration set,
``S_b = E[2 (l(z_q) - l(z_fp) - g.dz)] / E[||dz||^2]`` where ``z`` is the block output,
``dz = z_q - z_fp`` and ``g`` the gradient of the loss ``l`` at ``z_fp``; the expectation runs
over samples, ``||dz||^2`` sums over a sample's elements. For a quadratic ``l`` with Hessian H
and isotropic ``dz`` this is the mean curvature ``tr(H)/n``. ``omega_b = S_b * mean|dz|``."""
from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from packptq.config import ConfigError
from packptq.evaluate import kl_per_sample
from packptq.registry import Registry

#: policy name -> fn(block_names, scores, cfg, seed) -> list of packs (lists of block indices)
PACKING: Registry[Callable] = Registry("packing policy")
SCORE_LOSSES = ("kl", "ce", "official")


@dataclass
class PackingConfig:
    policy: str = "hessian"  # none | layer | block | hessian | fixed | net | random | manual
    loss: str = "kl"  # kl | ce | official (importance-score loss)
    size: int = 2  # blocks per pack for `fixed`
    packs: Optional[List[List[str]]] = None  # block names per pack for `manual`
    seed: Optional[int] = None  # `random` boundaries (default: the run seed)

    def __post_init__(self) -> None:
        if self.policy not in PACKING:
            raise ConfigError(f"unknown packing.policy '{self.policy}'; known: {', '.join(PACKING.names())}")
        if self.loss not in SCORE_LOSSES:
            raise ConfigError(f"packing.loss={self.loss}; use one of {SCORE_LOSSES}")
        if self.size < 1:
            raise ConfigError(f"packing.size={self.size} must be >= 1")
        if self.policy == "manual" and not self.packs:
            raise ConfigError("packing=manual needs packing.packs=[[block,...],[...]] (block names)")

    @property
    def needs_scores(self) -> bool:
        return self.policy in ("hessian", "random")


# -- policies -------------------------------------------------------------------------------
def hessian_packs(scores: Sequence[float]) -> List[List[int]]:
    """Adaptive packing: scan the scope [0, t_e], cut a pack at argmin(S) (leftmost on ties),
    shrink the scope to its left, repeat. Packs start exactly at the strict running minima."""
    packs: List[List[int]] = []
    te = len(scores) - 1
    while te >= 0:
        window = list(scores[: te + 1])
        tmin = min(range(len(window)), key=lambda i: (window[i], i))
        packs.insert(0, list(range(tmin, te + 1)))
        te = tmin - 1
    return packs


@PACKING.register("none")
def _none(names, scores, cfg, seed):
    return []


@PACKING.register("layer")
def _layer(names, scores, cfg, seed):
    return [[i] for i in range(len(names))]  # block order; layers are split by the pipeline


@PACKING.register("block")
def _block(names, scores, cfg, seed):
    return [[i] for i in range(len(names))]


@PACKING.register("net")
def _net(names, scores, cfg, seed):
    return [list(range(len(names)))]


@PACKING.register("fixed")
def _fixed(names, scores, cfg, seed):
    return [list(range(i, min(i + cfg.size, len(names)))) for i in range(0, len(names), cfg.size)]


@PACKING.register("hessian")
def _hessian(names, scores, cfg, seed):
    if scores is None:
        raise ValueError("hessian packing needs scores")
    return hessian_packs(scores)


@PACKING.register("random")
def _random_packs(names, scores, cfg, seed):
    """Same pack-size histogram as Hessian packing, sizes in a seeded random order."""
    sizes = [len(p) for p in hessian_packs(scores)]
    _random.Random(cfg.seed if cfg.seed is not None else seed).shuffle(sizes)
    packs, i = [], 0
    for s in sizes:
        packs.append(list(range(i, i + s)))
        i += s
    return packs


@PACKING.register("manual")
def _manual(names, scores, cfg, seed):
    index = {n: i for i, n in enumerate(names)}
    packs = []
    for p in cfg.packs:
        unknown = [n for n in p if n not in index]
        if unknown:
            raise ConfigError(f"packing.packs names unknown blocks {unknown}; blocks are {names}")
        packs.append([index[n] for n in p])
    flat = [i for p in packs for i in p]
    if flat != list(range(len(names))):
        raise ConfigError("packing.packs must list every block exactly once, contiguous and in order; "
                          f"blocks are {names}")
    return packs


def make_packs(cfg: PackingConfig, names: List[str], scores: Optional[Sequence[float]], seed: int) -> List[List[int]]:
    return PACKING.get(cfg.policy)(names, scores, cfg, seed)


# -- scores ---------------------------------------------------------------------------------
def _batched(x: torch.Tensor, bs: int):
    for i in range(0, len(x), bs):
        yield i, x[i:i + bs]


def _rest(blocks: Sequence[nn.Module], suffix: nn.Module, z: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        z = b(z)
    return suffix(z)


def block_score(z_fp: torch.Tensor, z_q: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                loss: str = "kl", fp_loss_zero: bool = False) -> tuple[float, float, float, float]:
    """Sums over one batch for the score of one block.

    ``loss_fn(z)`` returns per-sample losses [B]. Returns (numerator sum, ||dz||^2 sum, sum of
    mean|dz| per sample, number of elements per sample); S = num / den over the whole set."""
    dz = (z_q - z_fp).detach()
    if loss == "official":
        return _official_terms(z_fp, z_q, loss_fn)
    lq = loss_fn(z_q.detach()).detach()
    if fp_loss_zero:  # KL to the FP output: l(z_fp) = 0 and g = 0
        num = 2 * lq.sum()
    else:
        z0 = z_fp.detach().requires_grad_(True)
        l0 = loss_fn(z0)
        (g,) = torch.autograd.grad(l0.sum(), z0)
        num = 2 * (lq - l0.detach() - (g * dz).flatten(1).sum(1)).sum()
    return float(num), float(dz.pow(2).flatten(1).sum(1).sum()), float(dz.abs().flatten(1).mean(1).sum()), dz[0].numel()


def _official_terms(z_fp, z_q, loss_fn):
    # The official code: L = KL against the quantized model's probabilities, evaluated and
    # differentiated at z_fp; S = (L - g.(z_fp - z_q)) / mean(0.5 (z_fp - z_q)^2). Returned
    # as per-batch sums so that num/den reproduces that ratio.
    z0 = z_fp.detach().requires_grad_(True)
    l0 = loss_fn(z0)
    (g,) = torch.autograd.grad(l0.sum(), z0)
    d = (z_fp - z_q).detach()
    num = (l0.detach() - (g * d).flatten(1).sum(1)).sum()
    den = (0.5 * d.pow(2)).flatten(1).mean(1).sum()
    return float(num), float(den), float(d.abs().flatten(1).mean(1).sum()), 1


@torch.no_grad()
def _forward(fn, x, bs):
    return torch.cat([fn(xb) for _, xb in _batched(x, bs)])


def hessian_scores(fp_split, q_split, x: torch.Tensor, y: torch.Tensor, loss: str = "kl",
                   batch_size: int = 64, progress: bool = True) -> dict:
    """Importance score S_b and omega_b of every block: only block b quantized (the quantized
    model's block with initialised quantizers), every other part FP. ``x`` [n, ...] calibration
    inputs, ``y`` [n] labels. Returns {"S": [...], "omega": [...], "names": [...], "loss": loss}."""
    fp_blocks = [b for _, b in fp_split.blocks]
    q_blocks = [b for _, b in q_split.blocks]
    h = _forward(fp_split.prefix, x, batch_size)  # FP input of block 0
    fp_logits = _forward(fp_split.forward, x, batch_size)
    S, omega = [], []
    it = tqdm(range(len(fp_blocks)), desc="score blocks", disable=not progress, leave=False)
    for b in it:
        num = den = absdz = 0.0
        for i, hb in _batched(h, batch_size):
            with torch.no_grad():
                z_fp = fp_blocks[b](hb)
                z_q = q_blocks[b](hb)
            rest = lambda z: _rest(fp_blocks[b + 1:], fp_split.suffix, z)  # noqa: E731
            yb, pb = y[i:i + len(hb)], fp_logits[i:i + len(hb)]
            if loss == "kl":
                fn = lambda z: kl_per_sample(pb, rest(z))  # noqa: E731
            elif loss == "ce":
                fn = lambda z: F.cross_entropy(rest(z), yb, reduction="none")  # noqa: E731
            else:
                with torch.no_grad():
                    pq = rest(z_q)
                fn = lambda z: kl_per_sample(pq, rest(z))  # noqa: E731
            with torch.enable_grad():
                n_, d_, a_, _ = block_score(z_fp, z_q, fn, loss, fp_loss_zero=(loss == "kl"))
            num, den, absdz = num + n_, den + d_, absdz + a_
        s = num / max(den, 1e-30)
        S.append(s)
        omega.append(s * absdz / len(h))
        with torch.no_grad():
            h = _forward(fp_blocks[b], h, batch_size)
    return {"names": fp_split.block_names, "S": S, "omega": omega, "loss": loss}
