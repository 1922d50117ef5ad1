"""Reconstruction of one unit (a layer, a block, or a pack of consecutive blocks).

The activation cache holds three tensors over the calibration set: the unit's input in the
quantized model, its input in the FP model, and the FP output. It is sampled in memory (no
DataLoader work per step); only the unit being trained sits on the training device. Each unit
is one ``Trainer.fit(max_steps=iters)``; afterwards it is frozen (hard rounding, no drop)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import lightning as L
import torch
from torch import nn

from packptq.config import ConfigError
from packptq.quant.convert import freeze
from packptq.quant.quantizer import ActQuantizer, WeightQuantizer


@dataclass
class ReconConfig:
    iters: int = 500  # optimisation steps per unit
    batch_size: int = 32
    w_lr: float = 3e-3  # AdaRound rounding variables (Adam)
    a_lr: float = 4e-5  # activation step sizes (Adam, cosine to 0)
    reg_lambda: float = 0.01  # rounding regulariser weight
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the rounding regulariser
    drop_prob: float = 0.5  # QDrop: probability of taking the quantized input element
    drop_inside: bool = False  # also drop inside the unit (QDrop's activation drop)
    learn_act: bool = True
    adaround: bool = True
    cache_dtype: str = "float32"  # float32 | float16 (halves cache memory)
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ConfigError(f"recon.iters={self.iters} must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"recon.batch_size={self.batch_size} must be >= 1")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"recon.drop_prob={self.drop_prob} must be in [0, 1]")
        if self.cache_dtype not in ("float32", "float16"):
            raise ConfigError(f"recon.cache_dtype={self.cache_dtype}; use float32|float16")


class ActivationCache:
    """(q_in, fp_in, fp_out) over the calibration set, [n, ...] each, kept where they are
    created (CPU by default); ``batches`` yields random mini-batches forever."""

    def __init__(self, q_in: torch.Tensor, fp_in: torch.Tensor, fp_out: torch.Tensor, dtype: str = "float32"):
        dt = torch.float16 if dtype == "float16" else torch.float32
        self.q_in, self.fp_in, self.fp_out = (t.detach().to(dt) for t in (q_in, fp_in, fp_out))
        if not (len(self.q_in) == len(self.fp_in) == len(self.fp_out)):
            raise ValueError("activation cache tensors disagree in length")

    def __len__(self) -> int:
        return len(self.q_in)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q_in, self.fp_in, self.fp_out))

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, ...]]:
        n = len(self)
        while True:
            idx = torch.randint(n, (min(batch_size, n),), generator=generator)
            yield tuple(t[idx].float() for t in (self.q_in, self.fp_in, self.fp_out))


class _Steps:
    """An iterable of cache batches for Lightning (it accepts any iterable)."""

    def __init__(self, cache: ActivationCache, batch_size: int, seed: int) -> None:
        self.cache, self.batch_size, self.seed = cache, batch_size, seed

    def __iter__(self):
        return self.cache.batches(self.batch_size, torch.Generator().manual_seed(self.seed))


def unit_parameters(unit: nn.Module, cfg: ReconConfig) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Set up AdaRound variables and learnable act scales in ``unit``; return (w_params, a_params)."""
    w_params, a_params = [], []
    for m in unit.modules():
        if isinstance(m, WeightQuantizer) and m.enabled and cfg.adaround:
            weight = _owner_weight(unit, m)
            m.init_adaround(weight)
            w_params.append(m.alpha)
        elif isinstance(m, ActQuantizer) and cfg.learn_act and m.q.learn_scale and bool(m.q.initialized):
            m.q.scale.requires_grad_(True)
            a_params.append(m.q.scale)
    return w_params, a_params


def _owner_weight(unit: nn.Module, wq: WeightQuantizer) -> torch.Tensor:
    for m in unit.modules():
        if getattr(m, "wq", None) is wq:
            return m.layer.weight.detach()
    raise RuntimeError("weight quantizer without its layer")


def rec_loss(out: torch.Tensor, target: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and the remaining positions."""
    return (out - target).pow(2).sum(dim=channel_dim).mean()


class UnitReconstruction(L.LightningModule):
    """Trains one unit's rounding variables and activation step sizes against the FP output."""

    def __init__(self, unit: nn.Module, cfg: ReconConfig, key: str, channel_dim: int = 1,
                 step_offset: int = 0) -> None:
        super().__init__()
        self.unit = unit
        self.cfg = cfg
        self.key = key
        self.channel_dim = channel_dim
        self.step_offset = step_offset
        self.w_params, self.a_params = unit_parameters(unit, cfg)
        self.wqs = [m for m in unit.modules() if isinstance(m, WeightQuantizer) and m.alpha is not None]
        self.aqs = [m for m in unit.modules() if isinstance(m, ActQuantizer)]
        self.losses: List[float] = []
        self.automatic_optimization = True

    def on_train_start(self) -> None:
        self.unit.eval()  # no dropout / BN updates; quantizer modes are set explicitly
        for m in self.aqs:
            m.drop_prob = (1.0 - self.cfg.drop_prob) if self.cfg.drop_inside else 0.0
            m.training = self.cfg.drop_inside

    def beta(self, step: int) -> Optional[float]:
        """Annealed exponent of the regulariser; None while it is off (warm-up)."""
        total = max(1, self.cfg.iters)
        start = self.cfg.warmup * total
        if step < start:
            return None
        t = (step - start) / max(1.0, total - start)
        return self.cfg.beta_start + (self.cfg.beta_end - self.cfg.beta_start) * t

    def training_step(self, batch, batch_idx):
        q_in, fp_in, fp_out = batch
        if self.cfg.drop_prob < 1.0:
            take_q = torch.rand_like(q_in) < self.cfg.drop_prob
            x = torch.where(take_q, q_in, fp_in)
        else:
            x = q_in
        out = self.unit(x)
        rec = rec_loss(out, fp_out, self.channel_dim)
        loss = rec
        b = self.beta(self.global_step)
        if b is not None and self.wqs:
            loss = loss + self.cfg.reg_lambda * sum(m.round_reg(b) for m in self.wqs)
        rec_v = rec.detach()
        self.losses.append(rec_v)
        if self.logger is not None and (batch_idx % self.cfg.log_every == 0 or batch_idx == self.cfg.iters - 1):
            self.logger.log_metrics({f"recon/{self.key}/loss": float(rec_v), f"recon/{self.key}/total": float(loss)},
                                    step=self.step_offset + batch_idx)
        return loss

    def configure_optimizers(self):
        groups = []
        if self.w_params:
            groups.append({"params": self.w_params, "lr": self.cfg.w_lr})
        if self.a_params:
            groups.append({"params": self.a_params, "lr": self.cfg.a_lr})
        opt = torch.optim.Adam(groups)
        iters = max(1, self.cfg.iters)
        lams = [(lambda s: 1.0) if g["params"] is self.w_params else
                (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, iters) / iters))) for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lams)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_trainer(trainer_kwargs: dict, iters: int, logger=None) -> L.Trainer:
    kw = dict(accelerator="auto", devices=1, enable_checkpointing=False, enable_model_summary=False,
              enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1)
    kw.update(trainer_kwargs)
    kw.update(max_steps=iters, logger=logger if logger is not None else False)
    return L.Trainer(**kw)


def reconstruct_unit(unit: nn.Module, cache: ActivationCache, cfg: ReconConfig, key: str, seed: int,
                     channel_dim: int = 1, trainer_kwargs: Optional[dict] = None, logger=None,
                     step_offset: int = 0) -> List[float]:
    """Fit ``unit`` to the cached FP outputs, then freeze it. Returns the per-step losses."""
    if cfg.iters == 0:
        freeze(unit)
        return []
    torch.manual_seed(seed)
    module = UnitReconstruction(unit, cfg, key, channel_dim, step_offset)
    if not module.w_params and not module.a_params:
        freeze(unit)
        return []
    trainer = make_trainer(dict(trainer_kwargs or {}), cfg.iters, logger)
    trainer.fit(module, train_dataloaders=_Steps(cache, cfg.batch_size, seed))
    freeze(unit)
    for m in module.aqs:
        m.training = False
    return [float(v) for v in module.losses]
