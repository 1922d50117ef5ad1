"""Bit accounting: weight counts, average weight/activation bits, storage size, the
``bits.json`` artifact and ``bit_accounting`` of a quantized model.

Weights are counted one way everywhere (``weight_count``): the weight elements of every
Conv1d/Conv2d/Linear inside the given modules, each layer once. ``quantize_model`` turns exactly
these layers into QuantLayers and keeps each as ``QuantLayer.layer``, so the count is the same on
the unquantized model and on the quantized one."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from packptq.mp.config import MAX_BITS, MIN_BITS, Allocation
from packptq.quant import act_quantizers, quant_layers

BITS_JSON_VERSION = 1
#: the layer types ``quantize_model`` turns into QuantLayers
QUANTIZED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_count(modules: Iterable[nn.Module]) -> int:
    """Quantized weights (elements) inside ``modules``: the weights of every Conv1d/Conv2d/Linear
    among them or below them, each layer counted once."""
    seen = {id(m): m for top in modules for m in top.modules() if isinstance(m, QUANTIZED_TYPES)}
    return sum(int(m.weight.numel()) for m in seen.values())


def quantized_layers(modules: Iterable[nn.Module]) -> List[nn.Module]:
    """The outermost quantized layers among or below ``modules``, in module order, each once: a
    QuantLayer (not its inner Conv/Linear) or, on an unquantized model, a Conv1d/Conv2d/Linear."""
    from packptq.quant import QuantLayer

    out, seen = [], set()
    for top in modules:
        for m in top.modules():
            if id(m) in seen:
                continue
            if isinstance(m, QuantLayer):
                seen.update(id(x) for x in m.modules())
                out.append(m)
            elif isinstance(m, QUANTIZED_TYPES):
                seen.add(id(m))
                out.append(m)
    return out


def act_count(modules: Iterable[nn.Module]) -> int:
    """Activation elements per sample quantized inside ``modules``: ``elems_per_sample`` of every
    enabled activation quantizer among or below them (the inputs of QuantLayers, both operands
    of quantized attention matmuls), each counted once; 0 before calibration."""
    from packptq.quant import ActQuantizer, QuantLayer

    seen = {}
    for top in modules:
        for m in top.modules():
            if isinstance(m, QuantLayer) and not m.act_enabled:
                seen[id(m.aq)] = None
            elif isinstance(m, ActQuantizer) and id(m) not in seen:
                seen[id(m)] = m
    return sum(int(m.elems_per_sample) for m in seen.values() if m is not None)


def weight_counts(split) -> Tuple[List[int], int, int]:
    """(weights per block, prefix weights, suffix weights) of a model split
    (``packptq.zoo.split_model``), quantized or not."""
    return ([weight_count([b]) for _, b in split.blocks],
            weight_count([m for _, m in split.prefix.submodules()]),
            weight_count([m for _, m in split.suffix.submodules()]))


def bit_accounting(qmodel: nn.Module) -> Dict[str, Any]:
    """Accounting over every QuantLayer of ``qmodel`` at its current bits: ``w_bits_avg`` bits
    per weight, weighted by weight count; ``a_bits_avg`` bits per activation element, weighted by
    each enabled activation quantizer's elements per sample (None before calibration);
    ``size_bytes`` (``model_size_bytes``: packed weights, an fp32 scale and an 8-bit zero point
    per output channel, fp32 bias); ``n_weights``."""
    layers = [m for _, m in quant_layers(qmodel)]
    counts = [weight_count([m]) for m in layers]
    acts = [(int(a.elems_per_sample), a.bits) for _, a in act_quantizers(qmodel) if int(a.elems_per_sample) > 0]
    return {
        "w_bits_avg": avg_weight_bits(counts, [m.wq.bits for m in layers]),
        "a_bits_avg": avg_act_bits([e for e, _ in acts], [b for _, b in acts]) if acts else None,
        "size_bytes": model_size_bytes([(n, m.wq.bits, m.layer.weight.shape[0], m.layer.bias is not None)
                                        for n, m in zip(counts, layers)]),
        "n_weights": sum(counts),
    }


def _weighted_mean(counts: Sequence[int], bits: Sequence[int], what: str) -> float:
    if len(counts) != len(bits):
        raise ValueError(f"{what}: {len(counts)} counts but {len(bits)} bit-widths")
    total = sum(int(c) for c in counts)
    if total <= 0:
        raise ValueError(f"{what}: counts sum to {total}")
    return sum(int(c) * int(b) for c, b in zip(counts, bits)) / total


def avg_weight_bits(sizes: Sequence[int], bits: Sequence[int]) -> float:
    """Average bits per weight: sum(sizes * bits) / sum(sizes). sizes: weights per group (pass
    prefix and suffix as groups of their own to get the model average)."""
    return _weighted_mean(sizes, bits, "avg_weight_bits")


def avg_act_bits(act_elems: Sequence[int], bits: Sequence[int]) -> float:
    """Average bits per activation element: weighted by ``act_elems``, the quantized activation
    elements per sample (one input image) of each quantizer or group."""
    return _weighted_mean(act_elems, bits, "avg_act_bits")


def model_size_bytes(layers: Sequence[Tuple[int, int, int, bool]]) -> int:
    """Storage of the quantized layers in bytes.

    layers: (n_weights, w_bits, n_out_channels, has_bias) per Conv/Linear. Convention:
    - 2..8-bit weights: ceil(n_weights * w_bits / 8) bytes (bit-packed per layer), plus per
      output channel a float32 scale (4 bytes) and a zero point stored in one byte;
    - 16- or 32-bit (float) weights: n_weights * w_bits / 8 bytes, no scale or zero point;
    - bias: float32, 4 bytes per output channel.
    Norm layers and other non-quantized parameters are not counted."""
    total = 0
    for n_weights, w_bits, n_out, has_bias in layers:
        n_weights, w_bits, n_out = int(n_weights), int(w_bits), int(n_out)
        if MIN_BITS <= w_bits <= MAX_BITS:
            total += -(-n_weights * w_bits // 8) + n_out * (4 + 1)
        elif w_bits in (16, 32):
            total += n_weights * w_bits // 8
        else:
            raise ValueError(f"w_bits must be in {MIN_BITS}..{MAX_BITS}, 16 or 32, got {w_bits}")
        if has_bias:
            total += 4 * n_out
    return total


def bits_json(pack_names: Sequence[Sequence[str]], allocation: Allocation,
              act_bits: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The ``bits.json`` artifact (version 1): an ordered list of packs, each with its block
    names, weight bits, activation bits (or null) and weight count, plus prefix/suffix and the
    allocation summary. ``load_bits_json`` reads it back."""
    n = len(allocation.bits)
    if len(pack_names) != n or (act_bits is not None and len(act_bits) != n):
        raise ValueError(f"bits_json: {n} packs but {len(pack_names)} name lists")
    return {
        "version": BITS_JSON_VERSION,
        "policy": allocation.policy,
        "target_bits": allocation.target_bits,
        "candidates": list(allocation.candidates),
        "prefix": {"w_bits": allocation.prefix_bits, "n_weights": allocation.prefix_weights},
        "suffix": {"w_bits": allocation.suffix_bits, "n_weights": allocation.suffix_weights},
        "packs": [
            {
                "blocks": list(names),
                "w_bits": allocation.bits[j],
                "a_bits": None if act_bits is None else int(act_bits[j]),
                "n_weights": allocation.sizes[j],
            }
            for j, names in enumerate(pack_names)
        ],
        "total_bits": allocation.total_bits,
        "avg_bits": allocation.avg_bits,
        "budget_avg_bits": allocation.budget_avg_bits,
        "budget_bits": allocation.budget_bits,
        "cost": allocation.cost,
        "solver": allocation.solver,
    }


def load_bits_json(
    obj: Mapping[str, Any],
) -> Tuple[List[List[str]], Allocation, Optional[List[int]]]:
    """Inverse of ``bits_json``: (pack_names, allocation, act_bits or None)."""
    version = obj.get("version")
    if version != BITS_JSON_VERSION:
        raise ValueError(
            f"bits.json version {version!r} is not supported (expected {BITS_JSON_VERSION})"
        )
    packs = obj["packs"]
    a_bits = [p["a_bits"] for p in packs]
    alloc = Allocation(
        policy=obj["policy"], target_bits=obj["target_bits"],
        candidates=tuple(obj["candidates"]), bits=tuple(p["w_bits"] for p in packs),
        sizes=tuple(p["n_weights"] for p in packs),
        prefix_bits=obj["prefix"]["w_bits"], suffix_bits=obj["suffix"]["w_bits"],
        prefix_weights=obj["prefix"]["n_weights"], suffix_weights=obj["suffix"]["n_weights"],
        total_bits=obj["total_bits"], avg_bits=obj["avg_bits"],
        budget_avg_bits=obj["budget_avg_bits"], budget_bits=obj["budget_bits"], cost=obj["cost"],
        solver=obj["solver"],
    )
    acts = None if any(a is None for a in a_bits) else a_bits
    return [list(p["blocks"]) for p in packs], alloc, acts
