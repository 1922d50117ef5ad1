"""Transformer-specific quantization transforms: RepQ-ViT's post-LayerNorm reparameterisation.

The output of a LayerNorm varies wildly from channel to channel, so a per-tensor quantizer on
it (the input quantizer of the next Linear) wastes most of its levels. RepQ-ViT calibrates a
*per-channel* asymmetric quantizer there (scale ``s_c``, zero point ``z_c``), then folds the
per-channel part away so that a per-tensor quantizer with ``s~ = mean(s)``, ``z~ =
round(mean(z))`` produces exactly the same integers:

    r1 = s / s~,  r2 = z - z~
    LayerNorm:  gamma' = gamma / r1,            beta' = (beta + s * r2) / r1
    Linear:     W'[:, c] = W[:, c] * r1[c],     b' = b - W @ (s * r2)

so ``X' = (X + s r2) / r1`` and ``X' / s~ + z~ = X / s + z`` (same rounding, same clamp), and
in floating point ``W' X' + b' = W X + b``: the block's FP function is unchanged. The weight
quantizer of the Linear is refitted to ``W'`` (the column scaling moves into the weights, which
are quantized per output channel). See docs/decisions.md.

Pairs are found by structure: in a module with ``norm1`` + ``attn.qkv`` or ``norm2`` +
``mlp.fc1`` (timm's ViT/DeiT ``Block`` and Swin's ``SwinTransformerBlock``), and confirmed by
tracing: the Linear must see the LayerNorm's output reordered but not padded (a Swin stage
whose resolution is not a multiple of the window pads zeros, which the shift would move)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from packptq.config import ConfigError
from packptq.quant.modules import QuantLayer
from packptq.quant.quantizer import search_range

#: (LayerNorm attribute, Linear path) inside one block: the Linear reads only that norm's output
LN_LINEAR_PAIRS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))


def ln_linear_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(LayerNorm name, QuantLayer name) pairs whose per-channel scale can be folded: the
    Linear's input quantizer is active and sits on its input, and nothing else (an attention
    gate) reads the same normalised tensor."""
    pairs = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        for norm_attr, lin_path in LN_LINEAR_PAIRS:
            norm = getattr(m, norm_attr, None)
            if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
                continue
            try:
                layer = m.get_submodule(lin_path)
            except AttributeError:
                continue
            if not (isinstance(layer, QuantLayer) and isinstance(layer.layer, nn.Linear)
                    and layer.placement == "input" and layer.act_enabled
                    and layer.layer.in_features == norm.normalized_shape[0]):
                continue
            if getattr(m.get_submodule(lin_path.rpartition(".")[0]), "gate", None) is not None:
                continue  # a gated attention's gate Linear reads the same tensor
            pairs.append((pre + norm_attr, pre + lin_path))
    return pairs


@torch.no_grad()
def ln_reparameterize(model: nn.Module, x: torch.Tensor, batch_size: int = 64, method: str = "mse",
                      max_rows: int = 8192, min_ratio: float = 1e-4) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """In place: fit a per-channel quantizer to each paired LayerNorm's output over the
    calibration inputs ``x`` [n, ...], fold its scale ratios into the LayerNorm and the next
    Linear (see the module docstring), and refit that Linear's weight quantizer.

    Returns ``{activation quantizer name: (scale s~, zero point z~)}``: the per-tensor ranges
    under which the folded model quantizes exactly like the per-channel one; ``calibrate``
    sets them after its own range search. ``max_rows`` caps the token rows kept per pair;
    ``min_ratio`` keeps a dead channel's ratio finite (the FP function is unchanged anyway)."""
    pairs = ln_linear_pairs(model)
    if not pairs:
        raise ConfigError(f"quant.ln_reparam=true, but {type(model).__name__} has no LayerNorm -> Linear "
                          f"pair to fold ({' / '.join('+'.join(p) for p in LN_LINEAR_PAIRS)} in one block); "
                          f"set quant.ln_reparam=false")
    rows: Dict[str, List[torch.Tensor]] = {lin: [] for _, lin in pairs}
    norm_numel: Dict[str, int] = {}
    padded: set = set()
    hooks = []

    def on_norm(name):
        def hook(_m, _i, out):
            norm_numel[name] = out.numel()
        return hook

    def on_linear(norm_name, name):
        def hook(_m, inp):
            t = inp[0].detach()
            if t.numel() != norm_numel.get(norm_name, -1):
                padded.add(name)
            flat = t.reshape(-1, t.shape[-1])
            keep = max(1, max_rows * batch_size // max(len(x), 1))
            if len(flat) > keep:
                flat = flat[torch.randperm(len(flat), device=flat.device)[:keep]]
            rows[name].append(flat.float().cpu())
        return hook

    for norm_name, lin in pairs:
        hooks.append(model.get_submodule(norm_name).register_forward_hook(on_norm(norm_name)))
        hooks.append(model.get_submodule(lin).register_forward_pre_hook(on_linear(norm_name, lin)))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()

    ranges: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    folded = []
    for norm_name, lin in pairs:
        if lin in padded or not rows[lin]:
            continue
        norm, layer = model.get_submodule(norm_name), model.get_submodule(lin)
        s, z = search_range(torch.cat(rows[lin]), layer.aq.bits, ch_axis=1, method=method, grid=layer.aq.q.grid)
        ranges[f"{lin}.aq"] = fold_channel_ranges(norm, layer, s, z, min_ratio)
        folded.append((norm_name, lin))
    model.packptq_ln_folded = folded
    return ranges


@torch.no_grad()
def copy_ln_reparam(qmodel: nn.Module, fp_model: nn.Module) -> int:
    """Give ``fp_model`` (an FP copy of the same network, e.g. the reconstruction reference)
    the folded LayerNorm and Linear parameters of ``qmodel``, so that the inputs of the folded
    Linears agree between the two (block outputs agree either way). Needed wherever an FP
    input of such a Linear is mixed with its quantized-model input (layer-wise units with
    QDrop). Returns the number of pairs copied."""
    pairs = getattr(qmodel, "packptq_ln_folded", None) or []
    for norm_name, lin in pairs:
        qn, fn = qmodel.get_submodule(norm_name), fp_model.get_submodule(norm_name)
        fn.weight = nn.Parameter(qn.weight.detach().clone(), requires_grad=False)
        fn.bias = nn.Parameter(qn.bias.detach().clone(), requires_grad=False)
        ql, fl = qmodel.get_submodule(lin).layer, fp_model.get_submodule(lin)
        fl = fl.layer if isinstance(fl, QuantLayer) else fl
        fl.weight.data = ql.weight.detach().clone()
        fl.bias = nn.Parameter(ql.bias.detach().clone(), requires_grad=False)
    return len(pairs)


def fold_channel_ranges(norm: nn.LayerNorm, layer: QuantLayer, s: torch.Tensor, z: torch.Tensor,
                        min_ratio: float = 1e-4) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place: fold the per-channel quantizer (scale ``s`` [C], integer zero point ``z`` [C])
    of ``norm``'s output into ``norm`` and ``layer`` (the Linear reading it), and refit the
    Linear's weight quantizer. Returns the per-tensor (scale, zero point) that now quantizes the
    folded output to the same integers: X' = (X + s r2) / r1 with r1 = s / s~, r2 = z - z~,
    and W' = W r1 (per input column), b' = b - W (s r2)."""
    s, z = s.float(), z.float()
    s_t, z_t = s.mean(), z.mean().round()
    r1 = (s / s_t).clamp(min=min_ratio)
    shift = s_t * r1 * (z - z_t)  # = s * r2 where r1 is not clamped
    dev = layer.weight.device
    shift, r1 = shift.to(dev), r1.to(dev)
    gamma = norm.weight.data if norm.weight is not None else torch.ones_like(r1)
    beta = norm.bias.data if norm.bias is not None else torch.zeros_like(r1)
    norm.weight = nn.Parameter(gamma / r1, requires_grad=False)
    norm.bias = nn.Parameter((beta + shift) / r1, requires_grad=False)
    lin = layer.layer
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    new_b = b - w @ shift
    lin.weight.data = w * r1[None, :]
    lin.bias = nn.Parameter(new_b, requires_grad=False)
    layer.wq.set_bits(layer.wq.bits, lin.weight.detach())
    return s_t.clone(), z_t.clone()
