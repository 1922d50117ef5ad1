"""Reconstruction of one unit (a layer, a block, or a pack of consecutive blocks).

The activation cache (``packptq.recon.cache``) holds three tensors over the calibration set: the
unit's input in the quantized model, its input in the FP model, and the FP output. It is sampled
directly (no DataLoader work per step) and hands each mini-batch over on the training device. Each unit
is one ``Trainer.fit(max_steps=iters)``; afterwards it is frozen (hard rounding, no drop)."""
from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import lightning as L
import torch
from torch import nn

from packptq.config import ConfigError, RunFailure
from packptq.runtime import TRAINER_DEFAULTS, release_freed_memory, reuse_freed_memory, step_bar
from packptq.quant.convert import freeze
from packptq.quant.quantizer import ActQuantizer, SoftRound, WeightQuantizer
from packptq.recon.cache import MODES, ActivationCache, parse_bytes


#: ``recon.drop_units`` and ``recon.loss_reduction`` choices
DROP_UNITS = ("all", "packs")
LOSS_REDUCTIONS = ("channel", "axis1")


@dataclass
class ReconConfig:
    iters: int = 500  # optimisation steps per unit (per block of a pack with iters_per=block)
    # unit: every unit gets `iters` steps (the paper: 20,000 per pack). block: a pack of k blocks
    # gets k * iters, the total of block-wise reconstruction (equal-compute comparisons)
    iters_per: str = "unit"
    batch_size: int = 32
    w_lr: float = 3e-3  # AdaRound rounding variables (Adam)
    a_lr: float = 4e-5  # activation step sizes (Adam, cosine to 0)
    reg_lambda: float = 0.01  # rounding regulariser weight
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the rounding regulariser
    drop_prob: float = 0.5  # QDrop: probability of taking the quantized input element
    drop_inside: bool = False  # also drop inside the unit (QDrop's activation drop)
    # which units mix their input (QDrop): all | packs (units made of blocks only; single prefix,
    # suffix and layer units take the quantized input as it is: the official Pack-PTQ code's)
    drop_units: str = "all"
    # the reconstruction loss's sum axis: channel (the unit output's channel axis: 1 for a conv
    # feature map, last for a Linear's [B, T, C]) | axis1 (axis 1 whatever it holds: the official
    # code's (out - target)^2 .sum(1).mean(), which sums tokens of a ViT block's [B, T, C])
    loss_reduction: str = "channel"
    learn_act: bool = True
    adaround: bool = True
    # where each unit's activation cache lives (packptq/recon/cache.py): keep (float32 in memory),
    # disk (a file in the run directory), half (float16), recompute (FP side per batch), or auto:
    # per unit, the first of those (fastest step first) whose memory fits cache_budget
    cache_mode: str = "auto"
    cache_budget: Optional[str] = None  # memory one unit's cache may hold: bytes, "512MB", "4GB"; null: no limit
    log_every: int = 50
    # the final evaluation's rounding: hard (on the quantization grid: the quantized model) |
    # soft (diagnostic only: AdaRound's soft h(V) kept at evaluation, weights off the grid, as the
    # official Pack-PTQ code evaluates; results.json's ``offgrid`` beside the on-grid top-1)
    eval_rounding: str = "hard"
    # at the start, a probe (1-2 s on the embedded resnet18) predicts each unit's wall time:
    # printed, and kept beside the measured time in unit_XX.json
    predict: bool = True

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ConfigError(f"recon.iters={self.iters} must be >= 0")
        if self.iters_per not in ("unit", "block"):
            raise ConfigError(f"recon.iters_per={self.iters_per}; use unit|block")
        if self.batch_size < 1:
            raise ConfigError(f"recon.batch_size={self.batch_size} must be >= 1")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"recon.drop_prob={self.drop_prob} must be in [0, 1]")
        if self.drop_units not in DROP_UNITS:
            raise ConfigError(f"recon.drop_units={self.drop_units}; use {'|'.join(DROP_UNITS)}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"recon.loss_reduction={self.loss_reduction}; use {'|'.join(LOSS_REDUCTIONS)}")
        if self.cache_mode not in ("auto",) + MODES:
            raise ConfigError(f"recon.cache_mode={self.cache_mode}; use {'|'.join(('auto',) + MODES)}")
        parse_bytes(self.cache_budget)
        for key in ("w_lr", "a_lr", "beta_start", "beta_end"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"recon.{key} must be a finite number > 0, got {v}")
        if not (self.reg_lambda >= 0 and math.isfinite(self.reg_lambda)):
            raise ConfigError(f"recon.reg_lambda must be a finite number >= 0, got {self.reg_lambda}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"recon.warmup={self.warmup} must be in [0, 1]")
        if self.log_every < 1:
            raise ConfigError(f"recon.log_every={self.log_every} must be >= 1")
        if self.eval_rounding not in ("hard", "soft"):
            raise ConfigError(f"recon.eval_rounding={self.eval_rounding}; use hard|soft (soft: an off-grid diagnostic)")


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


@contextmanager
def _weights_passthrough(wqs: List[WeightQuantizer]):
    """Inside the ``with`` body the weight quantizers return their input unchanged (the
    weights are handed in already quantized); their state is restored even on an error."""
    states = [m.enabled for m in wqs]
    try:
        for m in wqs:
            m.enabled = False
        yield
    finally:
        for m, e in zip(wqs, states):
            m.enabled = e


def _per_channel(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector [C] viewed to broadcast against a weight [C, ...]."""
    return t.view((-1,) + (1,) * (w.dim() - 1))


def rec_loss(out: torch.Tensor, target: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Squared error summed over axis ``channel_dim``, averaged over the other axes."""
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
        # the step is written out (manual optimization): Lightning's automatic loop wraps it in a
        # closure and hook calls that cost ~0.5 ms a step, a third of a classifier unit's step
        self.automatic_optimization = False
        self.grad_clip: Optional[Tuple[float, str]] = None  # (value, algorithm), from the trainer section
        self._prepare_weights()

    @torch.no_grad()
    def _prepare_weights(self) -> None:
        """Each step hands the unit its quantized weights (``_forward``); what is constant over
        the fit is computed here once, as non-persistent buffers that follow the module's
        device: floor(w / s) of every soft-rounded weight, and the whole quantized weight of
        enabled quantizers without rounding variables (``adaround=False``)."""
        owners = {id(m.wq): (n, m) for n, m in self.unit.named_modules()
                  if isinstance(getattr(m, "wq", None), WeightQuantizer) and hasattr(m, "layer")}
        self._soft: List[Tuple[str, WeightQuantizer, str]] = []  # (weight name in unit, quantizer, buffer)
        self._fixed: List[Tuple[str, str]] = []  # (weight name in unit, buffer)
        self._passthrough: List[WeightQuantizer] = []
        for wq in self.unit.modules():
            if not isinstance(wq, WeightQuantizer) or not wq.enabled or id(wq) not in owners:
                continue
            name, owner = owners[id(wq)]
            key = f"{name}.layer.weight" if name else "layer.weight"
            buf, w = f"_wq{len(self._passthrough)}", owner.layer.weight
            if wq.alpha is not None and wq.mode == "soft":
                self.register_buffer(buf, torch.floor(w / _per_channel(wq.scale, w)), persistent=False)
                self._soft.append((key, wq, buf))
            else:
                self.register_buffer(buf, wq(w).detach(), persistent=False)
                self._fixed.append((key, buf))
            self._passthrough.append(wq)

    def _forward(self, x: torch.Tensor, beta: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unit's output on ``x`` and the summed rounding regulariser at ``beta`` (0 when
        ``beta`` is None); same values as ``unit(x)`` and ``sum(m.round_reg(beta) for m in wqs)``."""
        weights: Dict[str, torch.Tensor] = {key: getattr(self, buf) for key, buf in self._fixed}
        reg = 0
        for key, wq, buf in self._soft:
            base = getattr(self, buf)
            w, r = SoftRound.apply(wq.alpha, base, _per_channel(wq.scale, base), _per_channel(wq.zero_point, base),
                                    wq.qmax, beta)
            weights[key] = w
            if beta is not None:
                reg = reg + r
        if not weights:
            return self.unit(x), reg
        with _weights_passthrough(self._passthrough):
            out = torch.func.functional_call(self.unit, weights, (x,), tie_weights=False, strict=False)
        return out, reg

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

    def step_loss(self, batch, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss, total loss with the regulariser) of one step on ``batch``
        = (q_in, fp_in, fp_out); ``step`` sets beta. The whole step minus the bookkeeping."""
        q_in, fp_in, fp_out = batch
        if self.cfg.drop_prob < 1.0:
            take_q = torch.rand_like(q_in) < self.cfg.drop_prob
            x = torch.where(take_q, q_in, fp_in)
        else:
            x = q_in
        b = self.beta(step) if self.wqs else None
        out, reg = self._forward(x, b)
        rec = rec_loss(out, fp_out, 1 if self.cfg.loss_reduction == "axis1" else self.channel_dim)
        loss = rec
        if b is not None:
            loss = loss + self.cfg.reg_lambda * reg
        return rec, loss

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        rec, loss = self.step_loss(batch, self.global_step)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.grad_clip is not None:  # trainer.gradient_clip_val, applied by hand in manual mode
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip[0], gradient_clip_algorithm=self.grad_clip[1])
        opt.step()
        sched.step()
        rec_v = rec.detach()
        self.losses.append(rec_v)
        if self.logger is not None and (batch_idx % self.cfg.log_every == 0 or batch_idx == self.cfg.iters - 1):
            self.logger.log_metrics({f"recon/{self.key}/loss": float(rec_v), f"recon/{self.key}/total": float(loss.detach())},
                                    step=self.step_offset + batch_idx)
        return loss

    def configure_optimizers(self):
        groups, w_group = [], None
        if self.w_params:
            w_group = {"params": self.w_params, "lr": self.cfg.w_lr}
            groups.append(w_group)
        if self.a_params:
            groups.append({"params": self.a_params, "lr": self.cfg.a_lr})
        params = self.w_params + self.a_params
        # the fused kernel is one pass per step over the rounding variables instead of ~10
        opt = _Adam(groups, fused=_fused_ok(params))
        iters = max(1, self.cfg.iters)
        # rounding variables: constant lr; activation step sizes: cosine to 0
        lams = [(lambda s: 1.0) if g is w_group else
                (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, iters) / iters))) for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lams)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Adam(torch.optim.Adam):
    """Adam without the per-step CUDA-graph capture check for parameters on the CPU: under
    Lightning (which asks torch to count CUDA devices through NVML) that check loads the NVML
    library on every step, about 0.4 ms, more than a one-layer unit's whole step."""

    def _accelerator_graph_capture_health_check(self) -> None:
        if any(p.device.type != "cpu" for g in self.param_groups for p in g["params"]):
            super()._accelerator_graph_capture_health_check()


def _fused_ok(params: List[torch.Tensor]) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: the default implementation
        return False
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def make_trainer(trainer_kwargs: dict, iters: int, logger=None, bar=None) -> L.Trainer:
    """The unit's trainer; ``bar`` (tqdm) advances by one per step."""
    kw = dict(TRAINER_DEFAULTS, enable_progress_bar=False, max_epochs=-1)
    kw.update(trainer_kwargs)
    kw.update(max_steps=iters, logger=logger if logger is not None else False)
    if bar is not None:
        kw["callbacks"] = [*kw.get("callbacks", []), step_bar(bar)]
    return L.Trainer(**kw)


@dataclass
class UnitRun:
    """How one unit is fitted, besides its ``ReconConfig``: ``key`` names it (logging
    namespace, errors), ``seed`` seeds its initialisation and batch order, ``channel_dim`` is
    its output's channel axis (``rec_loss``), ``trainer_kwargs`` the Lightning Trainer
    arguments, ``logger`` a Lightning logger, ``step_offset`` the logging step of its first
    step, ``bar`` a tqdm bar advanced by one per step (optional)."""

    key: str
    seed: int = 0
    channel_dim: int = 1
    trainer_kwargs: Optional[dict] = None
    logger: object = None
    step_offset: int = 0
    bar: object = None


def _fit_unit(unit: nn.Module, cache: ActivationCache, cfg: ReconConfig, run: UnitRun) -> List[float]:
    """The fit of ``reconstruct_unit``; the trainer and the module are garbage when it returns."""
    module = UnitReconstruction(unit, cfg, run.key, run.channel_dim, run.step_offset)
    if not module.w_params and not module.a_params:
        freeze(unit)
        return []
    kwargs = dict(run.trainer_kwargs or {})
    # Lightning clips only under automatic optimization: the unit's manual step applies it
    clip = kwargs.pop("gradient_clip_val", None)
    algorithm = kwargs.pop("gradient_clip_algorithm", None) or "norm"
    if clip:
        module.grad_clip = (float(clip), algorithm)
    trainer = make_trainer(kwargs, cfg.iters, run.logger, run.bar)
    with reuse_freed_memory():
        trainer.fit(module, train_dataloaders=_Steps(cache, cfg.batch_size, run.seed))
    freeze(unit)
    for m in module.aqs:
        m.training = False
    trainer.strategy.teardown()
    for cb in trainer.callbacks:  # Lightning gives every callback the module's log methods
        for name in ("log", "log_dict"):
            if getattr(getattr(cb, name, None), "__self__", None) is module:
                delattr(cb, name)
    return [float(v) for v in module.losses]


def reconstruct_unit(unit: nn.Module, cache: ActivationCache, cfg: ReconConfig, run: UnitRun) -> List[float]:
    """Fit ``unit`` to the cached FP outputs as ``run`` says (key, seed, trainer, ...), then
    freeze it. Returns the per-step losses."""
    if cfg.iters == 0:
        freeze(unit)
        return []
    torch.manual_seed(run.seed)
    # the trainer and the module refer to each other: without a collection after the fit, each
    # unit's optimizer state and weight buffers (about 4x its weights) outlived it until the end
    # of the run (+500 MB peak RSS on resnet18 block-wise, measured). The objects alive before
    # the unit are frozen so that the collection scans only what the unit created: a full
    # collection walks every object of the process (torch, Lightning, timm), 0.34 s per unit in
    # the test process. When the caller has frozen objects itself, nothing is frozen or thawed here.
    own_freeze = gc.get_freeze_count() == 0
    if own_freeze:
        gc.freeze()
    try:
        losses = _fit_unit(unit, cache, cfg, run)
        gc.collect()
    finally:
        if own_freeze:
            gc.unfreeze()
    release_freed_memory()
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        raise RunFailure(f"reconstruction of unit {run.key} diverged: loss {losses[bad]} at step {bad} of "
                          f"{len(losses)}; the finished units are kept in the run directory. Lower recon.w_lr "
                          f"/ recon.a_lr or check the calibration data")
    return losses

