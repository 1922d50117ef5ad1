"""Model conversion: BatchNorm folding, replacing layers by quantized ones, calibration of
activation quantizers, and quantizer state switches."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from packptq.config import ConfigError
from packptq.quant.modules import QAttention, QuantLayer, QWindowAttention
from packptq.quant.quantizer import RANGE_GRIDS, ActQuantizer, UniformQuantizer, WeightQuantizer

log = logging.getLogger("packptq")

_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _eval_identity() -> tuple:
    """Modules that are the identity in eval mode, so a BN after them still folds."""
    try:
        from timm.layers import DropBlock2d, DropPath

        return (nn.Identity, nn.modules.dropout._DropoutNd, DropPath, DropBlock2d)
    except Exception:  # pragma: no cover - timm layout changed
        return (nn.Identity, nn.modules.dropout._DropoutNd)


_EVAL_IDENTITY = _eval_identity()


#: activation range initialisations (``quant.act_init``, ``calibrate``)
ACT_INITS = ("fp_all", "quantized_batch")


@dataclass
class QuantConfig:
    w_bits: int = 4
    a_bits: int = 4
    first_last_bits: Optional[int] = 8  # null: first/last layers at w_bits/a_bits
    act_placement: str = "input"  # input (Pack-PTQ, RepQ-ViT) | output (BRECQ, QDrop)
    w_range: str = "mse"  # mse | minmax
    a_range: str = "mse"
    attn_prob: str = "uniform"  # uniform | log2 (post-softmax quantizer)
    quant_attn: bool = True  # quantize both operands of the attention matmuls
    ln_reparam: bool = False  # RepQ-ViT post-LayerNorm reparameterisation (packptq.quant.vit)
    # clipping ratios of the MSE range search, weights and activations (quantizer.RANGE_GRIDS):
    # full (1.0 ... 0.0125) | official (1.00 ... 0.21, the official Pack-PTQ code's)
    range_grid: str = "full"
    # activation range initialisation: fp_all (every calibration image, activations observed in
    # FP, weights quantized) | quantized_batch (the official code's: the first act_init_batch
    # calibration images in one forward with every quantizer active, each activation quantizer
    # fitted to the already-quantized input it receives)
    act_init: str = "fp_all"
    act_init_batch: int = 32  # images of the quantized_batch init (profile=official: recon.batch_size)

    def __post_init__(self) -> None:
        for k in ("w_bits", "a_bits"):
            v = getattr(self, k)
            if not 2 <= v <= 8:
                raise ConfigError(f"quant.{k}={v} is out of range; use 2..8")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise ConfigError(f"quant.first_last_bits={self.first_last_bits}; use 2..8 or null")
        if self.act_placement not in ("input", "output"):
            raise ConfigError(f"quant.act_placement={self.act_placement}; use input|output")
        for k in ("w_range", "a_range"):
            if getattr(self, k) not in ("mse", "minmax"):
                raise ConfigError(f"quant.{k}={getattr(self, k)}; use mse|minmax")
        if self.attn_prob not in ("uniform", "log2"):
            raise ConfigError(f"quant.attn_prob={self.attn_prob}; use uniform|log2")
        if self.range_grid not in RANGE_GRIDS:
            raise ConfigError(f"quant.range_grid={self.range_grid}; use {'|'.join(RANGE_GRIDS)}")
        if self.act_init not in ACT_INITS:
            raise ConfigError(f"quant.act_init={self.act_init}; use {'|'.join(ACT_INITS)}")
        if self.act_init_batch < 1:
            raise ConfigError(f"quant.act_init_batch={self.act_init_batch} must be >= 1")
        if self.ln_reparam and self.act_placement != "input":
            raise ConfigError("quant.ln_reparam=true folds the quantizer on a Linear's input, which "
                              "act_placement=output does not have; use quant.act_placement=input")


@torch.no_grad()
def fold_bn(model: nn.Module) -> int:
    """Fold every BatchNorm into the Conv/Linear registered just before it in the same parent
    (eval-mode statistics). timm's BatchNormAct keeps its activation. Returns the fold count."""
    n = 0
    for parent in list(model.modules()):
        prev_name, prev = None, None
        for name, child in list(parent.named_children()):
            if isinstance(child, _BN) and prev is not None and prev.weight.shape[0] == child.num_features:
                _fold_into(prev, child)
                setattr(parent, name, _bn_remainder(child))
                prev = None
                n += 1
            elif isinstance(child, _CONV + (nn.Linear,)):
                prev_name, prev = name, child
            elif not isinstance(child, _EVAL_IDENTITY):
                prev = None  # an activation, pooling, ... between them: the BN is not affine in the conv
    return n


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    k = gamma / std
    layer.weight.data.mul_(k.view(-1, *([1] * (layer.weight.dim() - 1))))
    b = layer.bias.data if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_b = (b - bn.running_mean) * k + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b)
    else:
        layer.bias.data.copy_(new_b)


def _bn_remainder(bn: nn.Module) -> nn.Module:
    # timm's BatchNormAct2d applies drop then act after the normalisation
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    parts = [m for m in parts if not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


#: attention class -> converter(module, QuantConfig) -> its quantized replacement. Matched on
#: the exact class: a subclass may override ``forward``, so it needs a converter of its own.
AttentionConverter = Callable[[nn.Module, "QuantConfig"], nn.Module]
ATTENTION_CONVERTERS: Dict[type, AttentionConverter] = {}


def register_attention(*classes: type) -> Callable[[AttentionConverter], AttentionConverter]:
    """Decorator: ``converter(module, cfg)`` quantizes attention modules of ``classes``."""
    def deco(fn: AttentionConverter) -> AttentionConverter:
        for cls in classes:
            if cls in ATTENTION_CONVERTERS:
                raise KeyError(f"attention converter for {cls.__qualname__} is registered twice")
            ATTENTION_CONVERTERS[cls] = fn
        return fn

    return deco


def _register_timm_attention() -> None:
    from timm.models.swin_transformer import WindowAttention
    from timm.models.vision_transformer import Attention

    @register_attention(Attention)
    def _vit(m, cfg):
        return QAttention(m, cfg.a_bits, cfg.attn_prob)

    @register_attention(WindowAttention)
    def _swin(m, cfg):
        return QWindowAttention(m, cfg.a_bits, cfg.attn_prob)


_register_timm_attention()


def convert_attention(model: nn.Module, cfg: "QuantConfig") -> List[str]:
    """In place: replace every attention module with a registered converter; returns the
    names replaced. Their inner Linear layers are left for the Conv/Linear pass."""
    done = []
    for name, m in list(model.named_modules()):
        conv = ATTENTION_CONVERTERS.get(type(m))
        if conv is not None and not any(name.startswith(d + ".") for d in done):
            _replace(model, name, conv(m, cfg))
            done.append(name)
    return done


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def execution_order(model: nn.Module, x: torch.Tensor, kinds=(QuantLayer,)) -> List[str]:
    """Names of modules of the given kinds in the order the forward first calls them."""
    order: List[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, kinds):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: order.append(n) if n not in order else None))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def quantize_model(model: nn.Module, cfg: QuantConfig, example: torch.Tensor) -> nn.Module:
    """In place: fold BN, swap attention and Conv/Linear layers for quantized ones with weight
    quantizers initialised (activation quantizers wait for ``calibrate``). ``example`` is one
    input batch, used to find the first and last layers in execution order."""
    model.eval()
    fold_bn(model)
    if cfg.quant_attn:
        convert_attention(model, cfg)
    # a layer whose weights the forward uses without calling it (nn.MultiheadAttention's
    # out_proj, a functional attention given qkv.weight) keeps its floating-point weights
    called = set(execution_order(model, example, kinds=_CONV + (nn.Linear,)))
    kept = []
    for name, m in list(model.named_modules()):
        if isinstance(m, _CONV + (nn.Linear,)) and not isinstance(m, QuantLayer):
            parent_name = name.rpartition(".")[0]
            if parent_name and isinstance(model.get_submodule(parent_name), QuantLayer):
                continue
            if name not in called:
                kept.append(name)
                continue
            _replace(model, name, QuantLayer(m, cfg.w_bits, cfg.a_bits, cfg.act_placement, cfg.w_range,
                                             cfg.range_grid))
    if kept:
        log.info("%d Conv/Linear layers are not called as modules (their weights are used by functions) and stay "
                 "in floating point: %s", len(kept), kept[:6])
    for m in model.modules():  # activation ranges are searched later (calibrate), on this grid
        if isinstance(m, UniformQuantizer):
            m.grid = cfg.range_grid
    for p in model.parameters():
        p.requires_grad_(False)
    order = execution_order(model, example)
    if not order:
        raise ConfigError(f"{type(model).__name__} has no Conv/Linear layer to quantize")
    first, last = model.get_submodule(order[0]), model.get_submodule(order[-1])
    if cfg.act_placement == "input":
        first.act_enabled = False  # the network input (image) is not quantized
    else:
        last.act_enabled = False  # the logits are not quantized
    if cfg.first_last_bits is not None:
        for m in (first, last):
            m.set_bits(cfg.first_last_bits, cfg.first_last_bits)
    model.packptq_first_last = (order[0], order[-1])
    model.packptq_quant_cfg = cfg  # calibrate reads ln_reparam from it
    model.packptq_example_shape = list(example.shape)  # export rebuilds the conversion with it
    return model


def act_quantizers(model: nn.Module) -> Iterator[Tuple[str, ActQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if isinstance(parent, QuantLayer) and not parent.act_enabled:
                continue
            yield name, m


def weight_quantizers(model: nn.Module) -> Iterator[Tuple[str, WeightQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantizer):
            yield name, m


def quant_layers(model: nn.Module) -> List[Tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, batch_size: int = 64, method: str = "mse",
              progress: bool = False, init: str = "fp_all", init_batch: int = 32) -> None:
    """Initialise every activation quantizer from the calibration inputs ``x`` [n, ...].

    ``init="fp_all"``: one pass over all of ``x`` (in batches of ``batch_size``) with weights
    quantized and activations observed in FP, then an MSE range search per quantizer on a
    subsample of what it saw. ``init="quantized_batch"`` (the official Pack-PTQ code's): one
    forward of the first ``init_batch`` inputs with every quantizer active; each activation
    quantizer fits its range to the whole input it receives, which upstream quantizers,
    initialised earlier in the same forward, have already quantized (``init_in_forward``).

    With ``quant.ln_reparam`` (read from the config ``quantize_model`` left on the model), a
    first pass fits per-channel ranges to the post-LayerNorm activations and folds them into
    the LayerNorm and the next Linear (``packptq.quant.vit.ln_reparameterize``, once per
    model); those Linears' input quantizers then take the equivalent per-tensor ranges."""
    qcfg = getattr(model, "packptq_quant_cfg", None)
    if qcfg is not None and qcfg.ln_reparam and getattr(model, "packptq_ln_ranges", None) is None:
        from packptq.quant.vit import ln_reparameterize

        model.packptq_ln_ranges = ln_reparameterize(model, x, batch_size, method)
    aqs = [m for _, m in act_quantizers(model)]
    device = next(model.parameters()).device
    if init == "quantized_batch":
        init_in_forward(model, x[:init_batch].to(device), method)
    elif init == "fp_all":
        for m in aqs:
            m.observing, m._samples = True, []
        starts = range(0, len(x), batch_size)
        bar = tqdm(total=len(starts) + len(aqs), desc="calibrate", unit="step", disable=not progress,
                   dynamic_ncols=True, leave=False)
        for i in starts:
            model(x[i:i + batch_size].to(device))
            bar.update(1)
        for m in aqs:
            m.finish_observing(method)
            bar.update(1)
        bar.close()
    else:
        raise ValueError(f"unknown activation init '{init}'; known: {', '.join(ACT_INITS)}")
    for name, (s, z) in (getattr(model, "packptq_ln_ranges", None) or {}).items():
        q = model.get_submodule(name).q
        q.scale.data.copy_(s)
        q.zero_point.copy_(z)


@torch.no_grad()
def init_in_forward(model: nn.Module, x: torch.Tensor, method: str = "mse") -> None:
    """One forward of the batch ``x`` in which every activation quantizer, when first called,
    fits its range to its whole input (``ActQuantizer.init_on``) and then quantizes it: each
    quantizer sees the activations of a network whose upstream quantizers are all active."""
    done = set()

    def pre_hook(m: ActQuantizer, args) -> None:
        if id(m) not in done:
            done.add(id(m))
            m.init_on(args[0], method)

    handles = [m.register_forward_pre_hook(pre_hook) for _, m in act_quantizers(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def set_quant_state(model: nn.Module, weights: bool = True, acts: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActQuantizer):
            m.q.enabled = acts


def freeze(module: nn.Module) -> None:
    """Final state after reconstruction: hard rounding, no QDrop, no gradients."""
    for m in module.modules():
        if isinstance(m, WeightQuantizer) and m.alpha is not None:
            m.mode = "hard"
            m.alpha.requires_grad_(False)
        elif isinstance(m, ActQuantizer):
            m.drop_prob = 0.0
            m.q.scale.requires_grad_(False)
