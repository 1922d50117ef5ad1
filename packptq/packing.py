"""Packing policies: how the blocks are grouped into reconstruction units.

Each policy is a ``PACKING`` registry entry that states what it needs and produces: whether it
needs block scores, what its units are made of (``packs``, ``layers`` or ``none``), which
``packing.*`` options it reads, and the function that forms the packs."""
from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from packptq.config import ConfigError
from packptq.registry import Registry
from packptq.scores import SCORE_LOSSES

#: form(block_names, scores, cfg, seed) -> packs (lists of consecutive block indices, in order)
FormFn = Callable[[List[str], Optional[Sequence[float]], "PackingConfig", int], List[List[int]]]


@dataclass(frozen=True)
class PackingPolicy:
    form: FormFn
    needs_scores: bool = False
    units: str = "packs"  # packs | layers (every QuantLayer of the blocks) | none
    required: Tuple[str, ...] = ()  # packing.* options that must be set
    reads: Tuple[str, ...] = ()  # packing.* options it reads (`loss` is read whenever scores are)


PACKING: Registry[PackingPolicy] = Registry("packing policy")


@dataclass
class PackingConfig:
    policy: str = "hessian"  # a PACKING entry: none | layer | block | hessian | fixed | net | random | manual
    loss: str = "kl"  # importance-score loss, a SCORE_LOSSES entry: kl | ce | official
    size: int = 2  # blocks per pack for `fixed`
    packs: Optional[List[List[str]]] = None  # block names per pack for `manual`
    seed: Optional[int] = None  # `random` boundaries (default: the run seed)

    def __post_init__(self) -> None:
        if self.policy not in PACKING:
            raise ConfigError(f"unknown packing.policy '{self.policy}'; known: {', '.join(PACKING.names())}")
        if self.loss not in SCORE_LOSSES:
            raise ConfigError(f"packing.loss={self.loss}; use one of {', '.join(SCORE_LOSSES.names())}")
        if self.size < 1:
            raise ConfigError(f"packing.size={self.size} must be >= 1")
        for key in self.entry.required:
            if not getattr(self, key):
                raise ConfigError(f"packing={self.policy} needs packing.{key} (e.g. packing.packs=[[block,...],[...]], "
                                  "block names)")

    def unused_options(self, scores_needed: bool) -> List[str]:
        """The ``packing.*`` options set away from their defaults that this run would ignore:
        those the policy does not read, and ``loss`` when no block scores are computed
        (``scores_needed``: the policy's or mixed precision's need)."""
        reads = set(self.entry.reads) | {"policy"} | ({"loss"} if scores_needed else set())
        return [f for f in self.__dataclass_fields__
                if f not in reads and getattr(self, f) != self.__dataclass_fields__[f].default]

    @property
    def entry(self) -> PackingPolicy:
        return PACKING.get(self.policy)

    @property
    def needs_scores(self) -> bool:
        return self.entry.needs_scores


def make_packs(cfg: PackingConfig, names: List[str], scores: Optional[Sequence[float]], seed: int) -> List[List[int]]:
    """The packs of ``cfg.policy`` over the blocks ``names`` (``scores``: S per block or None)."""
    if cfg.needs_scores and scores is None:
        raise ValueError(f"packing={cfg.policy} needs block scores")
    return cfg.entry.form(names, scores, cfg, seed)


def policy(name: str, **meta) -> Callable[[FormFn], FormFn]:
    """Register the form function it decorates as the packing policy ``name``, with the
    ``PackingPolicy`` fields ``meta`` (needs_scores, units, required, reads)."""
    return PACKING.register(name, make=lambda form: PackingPolicy(form=form, **meta))


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


@policy("none", units="none")
def _none(names, scores, cfg, seed):
    """RTN: nothing is reconstructed."""
    return []


@policy("layer", units="layers")  # AdaRound: every layer of every block is a unit
@policy("block")  # BRECQ / QDrop
def _each_block(names, scores, cfg, seed):
    """One pack per block."""
    return [[i] for i in range(len(names))]


@policy("net")
def _net(names, scores, cfg, seed):
    """The whole network as one pack."""
    return [list(range(len(names)))]


@policy("fixed", reads=("size",))
def _fixed(names, scores, cfg, seed):
    """Packs of ``packing.size`` consecutive blocks."""
    return [list(range(i, min(i + cfg.size, len(names)))) for i in range(0, len(names), cfg.size)]


@policy("hessian", needs_scores=True)
def _hessian(names, scores, cfg, seed):
    """Pack-PTQ: a pack starts at each new running minimum of S_b."""
    return hessian_packs(scores)


@policy("random", needs_scores=True, reads=("seed",))
def _random_packs(names, scores, cfg, seed):
    """Same pack-size histogram as Hessian packing, sizes in a seeded random order."""
    sizes = [len(p) for p in hessian_packs(scores)]
    _random.Random(cfg.seed if cfg.seed is not None else seed).shuffle(sizes)
    packs, i = [], 0
    for s in sizes:
        packs.append(list(range(i, i + s)))
        i += s
    return packs


@policy("manual", required=("packs",), reads=("packs",))
def _manual(names, scores, cfg, seed):
    """The packs ``packing.packs`` names (block names)."""
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


def run(ctx, cfg: PackingConfig, names: List[str], scores: Optional[Sequence[float]]) -> List[List[int]]:
    """The pack phase (``ctx``: the run's ``context.RunContext``): the packs of ``cfg.policy``
    over the blocks ``names`` (``scores``: S per block, or None), recorded in ``packs.json``
    (on resume they must equal the stored ones)."""
    with ctx.phase("pack", precision=False):
        packs = make_packs(cfg, names, scores, ctx.seed)
        ctx.rd.record("packs.json", {"policy": cfg.policy, "packs": [[names[i] for i in p] for p in packs]})
        ctx.log_table("packing/packs", ["pack", "blocks"], [[j, " ".join(names[i] for i in p)]
                                                            for j, p in enumerate(packs)])
    return packs
