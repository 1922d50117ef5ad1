"""The quantized model and its FP reference side by side, as every phase after calibration
uses them: both with BatchNorm folded, split into prefix / blocks / suffix, with the quantized
layers of each part listed in execution order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import nn

from packptq.quant.convert import execution_order
from packptq.zoo.graph import block_paths
from packptq.zoo.split import Split


@dataclass
class Twins:
    """qmodel: the quantized model; fp: the FP model with the same folded weights (the
    reconstruction targets); qsplit / fsplit: their splits; prefix_layers / block_layers[b] /
    suffix_layers: dotted QuantLayer names in execution order; device: where both run."""

    qmodel: nn.Module
    fp: nn.Module
    qsplit: Split
    fsplit: Split
    prefix_layers: List[str]
    block_layers: List[List[str]]
    suffix_layers: List[str]
    device: torch.device

    @property
    def block_names(self) -> List[str]:
        return self.qsplit.block_names

    def pair(self, name: str) -> Tuple[nn.Module, nn.Module]:
        """The module called ``name`` in the quantized and in the FP model."""
        return self.qmodel.get_submodule(name), self.fp.get_submodule(name)


def layer_groups(qmodel: nn.Module, qsplit: Split, x: torch.Tensor) -> Tuple[List[str], List[List[str]], List[str]]:
    """QuantLayer names of the prefix, of each block, and of the suffix, in execution order,
    found by running ``qmodel`` (and its prefix alone) on the example batch ``x``."""
    order = execution_order(qmodel, x)
    # a block is a module (its layers are below it, or it is a layer itself) or a part of the
    # graph that runs several modules (GraphBlock.names)
    paths = block_paths(qsplit)
    block_layers = [[o for o in order if any(o == p or o.startswith(p + ".") for p in ps)] for ps in paths]
    inside = {o for bl in block_layers for o in bl}
    outside = [o for o in order if o not in inside]
    with torch.no_grad():
        pre_order = execution_order(_Runner(qsplit.prefix, qmodel), x)
    prefix_layers = [o for o in outside if o in pre_order]
    suffix_layers = [o for o in outside if o not in pre_order]
    return prefix_layers, block_layers, suffix_layers


class _Runner(nn.Module):
    """Exposes ``model``'s modules by name while running only ``fn`` (for hook discovery)."""

    def __init__(self, fn: Callable, model: nn.Module) -> None:
        super().__init__()
        self.fn, self.model = fn, model

    def named_modules(self, *a, **k):
        return self.model.named_modules(*a, **k)

    def forward(self, x):
        return self.fn(x)
