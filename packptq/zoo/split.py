"""Block discovery: ``split_model(model) -> Split(prefix, blocks, suffix)``.

Blocks are the repeated units of an architecture; the prefix (stem) and suffix (head) are
everything outside them. Composition ``suffix(B_N(...B_1(prefix(x))))`` must reproduce
``model(x)`` exactly; ``check_split`` verifies it by running the model.

Prefix and suffix are thin modules that call into the model at run time (they do not hold
copies), so replacing leaves of the model (BN folding, quantized layers) is seen by them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import nn

from packptq.registry import Registry

#: family name -> rule(model) -> Split or None (None: "not mine")
SPLIT_RULES: Registry[Callable[[nn.Module], "Split | None"]] = Registry("model family")


class SplitError(ValueError):
    pass


class Fn(nn.Module):
    """A module view over part of ``model``'s forward; ``model`` is not registered as a child
    (its parameters stay owned by the model)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], names: List[str]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self._fn = fn
        #: dotted module names (in the model) that this part runs, in execution order
        self.names = list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self._model, x)

    def submodules(self) -> List[Tuple[str, nn.Module]]:
        """(dotted name, module) of the parts this view runs, resolved now."""
        return [(n, self._model.get_submodule(n)) for n in self.names]


@dataclass
class Split:
    prefix: Fn
    blocks: List[Tuple[str, nn.Module]]  # (dotted name in the model, block)
    suffix: Fn
    family: str = "?"

    @property
    def block_names(self) -> List[str]:
        return [n for n, _ in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prefix(x)
        for _, b in self.blocks:
            h = b(h)
        return self.suffix(h)


def split_model(model: nn.Module, family: str | None = None) -> Split:
    """Split ``model`` with the rule of ``family`` (or the first rule that accepts it)."""
    if family is not None and family != "auto":
        s = SPLIT_RULES.get(family)(model)
        if s is None:
            raise SplitError(f"model family rule '{family}' does not accept {type(model).__name__}")
        s.family = family
        return s
    tried = []
    for name, rule in SPLIT_RULES.items():
        if name == "generic":
            continue
        s = rule(model)
        tried.append(name)
        if s is not None:
            s.family = name
            return s
    if "generic" in SPLIT_RULES:
        s = SPLIT_RULES.get("generic")(model)
        if s is not None:
            s.family = "generic"
            return s
    children = ", ".join(f"{n}:{type(m).__name__}" for n, m in model.named_children())
    raise SplitError(
        f"cannot split {type(model).__name__} into prefix/blocks/suffix; tried rules {tried}; "
        f"its top-level children are [{children}]"
    )


@torch.no_grad()
def check_split(model: nn.Module, split: Split, x: torch.Tensor, atol: float = 1e-5) -> float:
    """Max abs difference between model(x) and the composed split; raises if above atol."""
    was = model.training
    model.eval()
    ref = model(x)
    out = split.forward(x)
    model.train(was)
    err = (ref - out).abs().max().item()
    if err > atol * max(1.0, ref.abs().max().item()):
        raise SplitError(f"split of {type(model).__name__} does not compose to its forward (max err {err:.3g})")
    return err


def _seq(names: List[str]) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for n in names:
            x = m.get_submodule(n)(x)
        return x

    return run


@SPLIT_RULES.register("resnet")
def _resnet(model: nn.Module) -> Split | None:
    if not all(hasattr(model, a) for a in ("conv1", "layer1", "layer4", "fc")):
        return None
    stem = [n for n in ("conv1", "bn1", "act1", "maxpool") if hasattr(model, n)]
    blocks = [(f"{layer}.{i}", b) for layer in ("layer1", "layer2", "layer3", "layer4")
              for i, b in enumerate(getattr(model, layer))]
    return Split(Fn(model, _seq(stem), stem), blocks,
                 Fn(model, lambda m, x: m.forward_head(x), ["global_pool", "fc"]))


@SPLIT_RULES.register("vit")
def _vit(model: nn.Module) -> Split | None:
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "_pos_embed")
            and hasattr(model, "norm_pre")):
        return None

    def prefix(m, x):
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    head = [n for n in ("norm", "fc_norm", "head") if hasattr(model, n)]
    return Split(Fn(model, prefix, ["patch_embed"]), blocks,
                 Fn(model, lambda m, x: m.forward_head(m.norm(x)), head))
