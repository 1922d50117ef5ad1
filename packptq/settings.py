"""The config sections packptq owns, typed once: ``Settings.of(cfg)`` merges each section into
its schema (``config.typed``) and checks how they combine, so a bad config is a ConfigError
before any compute. The pipeline, the Python API and the tests read the same object."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from packptq import mp
from packptq.config import ConfigError, typed
from packptq.mp.plan import MixedPrecision
from packptq.packing import PackingConfig
from packptq.quant import QuantConfig
from packptq.recon.unit import ReconConfig
from packptq.zoo.build import ModelConfig


@dataclass(frozen=True)
class Settings:
    """``quant``, ``recon``, ``packing`` and ``model`` typed; ``mp`` the mixed-precision plan
    (None for ``mp.policy=none``); ``model`` is None where the caller brings its own module."""

    quant: QuantConfig
    recon: ReconConfig
    packing: PackingConfig
    mp: Optional[MixedPrecision]
    model: Optional[ModelConfig] = None

    @classmethod
    def of(cls, cfg, model: bool = True) -> "Settings":
        """The sections of the composed config ``cfg`` (``model=False``: without ``model``)."""
        quant = typed(QuantConfig, cfg.quant, "quant")
        recon = typed(ReconConfig, cfg.recon, "recon")
        packing = typed(PackingConfig, cfg.packing, "packing")
        mcfg = typed(ModelConfig, cfg.model, "model") if model else None
        plan = mp.plan(cfg.mp, quant)
        s = cls(quant, recon, packing, plan, mcfg)
        if plan is not None:
            plan.check_score_loss(packing.loss)
        unused = packing.unused_options(s.needs_scores)
        if unused:
            raise ConfigError(f"packing.{unused[0]} has no effect with packing={packing.policy}"
                              f"{'' if s.needs_scores else ' (no block scores are computed)'}; remove it")
        return s

    @property
    def needs_scores(self) -> bool:
        """Whether block scores are computed: the packing policy or the bit allocator reads them."""
        return self.packing.needs_scores or (self.mp is not None and self.mp.needs_omega)
