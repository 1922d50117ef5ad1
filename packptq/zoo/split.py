"""Block discovery: ``split_model(model) -> Split(prefix, blocks, suffix)``.

Blocks are the repeated units of an architecture; the prefix (stem) and suffix (head) are
everything outside them. Composition ``suffix(B_N(...B_1(prefix(x))))`` must reproduce
``model(x)`` exactly; ``check_split`` verifies it by running the model.

Prefix and suffix are thin modules that call into the model at run time (they do not hold
copies), so replacing leaves of the model (BN folding, quantized layers) is seen by them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import nn

from packptq.config import ConfigError
from packptq.registry import Registry

#: family name -> rule(model) -> Split or None (None: "not mine"). A rule that needs to run the
#: model declares a keyword ``example_input`` (a tensor or None) and receives it.
SPLIT_RULES: Registry[Callable[[nn.Module], "Split | None"]] = Registry("model family")


class SplitError(ConfigError):
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


def split_model(model: nn.Module, family: str | None = None,
                example_input: torch.Tensor | None = None) -> Split:
    """Split ``model`` with the rule of ``family`` or, for ``None``/``"auto"``, the first named
    rule that accepts it, else the ``graph`` rule (blocks from the traced dataflow graph), else,
    for a model that cannot be traced, the ``generic`` rule (the module tree). ``example_input``
    (a batch the model accepts, e.g. ``[2, C, H, W]``) is optional: when given, the split is
    verified with ``check_split``; the graph and generic rules also run the model on it (they
    guess an input otherwise)."""
    if family is not None and family != "auto":
        s = _call_rule(SPLIT_RULES.get(family), model, example_input)
        if s is None:
            raise SplitError(f"model family rule '{family}' does not accept {type(model).__name__}; "
                             f"use model.family=auto (known: {', '.join(SPLIT_RULES.names())})")
        return _finish(model, s, family, example_input)
    tried = []
    for name, rule in SPLIT_RULES.items():
        if name in _GENERAL:
            continue
        s = _call_rule(rule, model, example_input)
        tried.append(name)
        if s is not None:
            return _finish(model, s, name, example_input)
    errors = []
    for name in _GENERAL:
        if name not in SPLIT_RULES:
            continue
        try:
            s = _call_rule(SPLIT_RULES.get(name), model, example_input)
        except SplitError as exc:
            errors.append(str(exc))
            continue
        if s is not None:
            return _finish(model, s, name, example_input)
    if errors:
        rest = f" (the module-tree rule 'generic': {errors[1]})" if len(errors) > 1 else ""
        raise SplitError(f"no family rule accepts {type(model).__name__} (tried {tried}); {errors[0]}{rest}")
    children = ", ".join(f"{n}:{type(m).__name__}" for n, m in model.named_children())
    raise SplitError(
        f"cannot split {type(model).__name__} into prefix/blocks/suffix; tried rules {tried}; "
        f"its top-level children are [{children}]"
    )


#: the rules for any model, tried in this order after the named family rules
_GENERAL = ("graph", "generic")


def _call_rule(rule: Callable, model: nn.Module, example_input: torch.Tensor | None) -> "Split | None":
    # Rules that trace the model (generic) take the example input; the structural ones do not.
    if "example_input" in inspect.signature(rule).parameters:
        return rule(model, example_input=example_input)
    return rule(model)


def _finish(model: nn.Module, s: Split, family: str, example_input: torch.Tensor | None) -> Split:
    s.family = family
    if not s.blocks:
        raise SplitError(f"rule '{family}' found no blocks in {type(model).__name__}")
    if example_input is not None:
        check_split(model, s, example_input)
    return s


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


def _present(model: nn.Module, names: List[str]) -> List[str]:
    """The names in ``names`` that are submodules of ``model`` (optional parts of a layout)."""
    out = []
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            continue
        out.append(n)
    return out


def _head(model: nn.Module, names: List[str], before: List[str] = ()) -> Fn:
    """Suffix: the modules ``before`` in order, then the model's own ``forward_head``."""
    run = _seq(list(before))
    return Fn(model, lambda m, x: m.forward_head(run(m, x)), list(before) + _present(model, names))


@SPLIT_RULES.register("resnet")
def _resnet(model: nn.Module) -> Split | None:
    """ResNet in timm's (ResNet/ResNet-D) or torchvision's layout: stem conv1..maxpool; blocks
    layer{1-4}.{i} (basic or bottleneck); suffix the head (timm's ``forward_head``, or
    torchvision's avgpool, flatten, fc)."""
    if not all(hasattr(model, a) for a in ("conv1", "layer1", "layer4", "fc")):
        return None
    timm_head = hasattr(model, "forward_head")
    if not timm_head and not (type(model).__module__.startswith("torchvision.") and hasattr(model, "avgpool")):
        return None
    stem = _present(model, ["conv1", "bn1", "act1", "relu", "maxpool"])
    blocks = [(f"{layer}.{i}", b) for layer in ("layer1", "layer2", "layer3", "layer4")
              for i, b in enumerate(getattr(model, layer))]
    if timm_head:
        return Split(Fn(model, _seq(stem), stem), blocks, _head(model, ["global_pool", "fc"]))
    head = Fn(model, lambda m, x: m.fc(torch.flatten(m.avgpool(x), 1)), ["avgpool", "fc"])
    return Split(Fn(model, _seq(stem), stem), blocks, head)


@SPLIT_RULES.register("vit")
def _vit(model: nn.Module) -> Split | None:
    """timm VisionTransformer (ViT, DeiT, DeiT distilled): patch embedding + tokens + position
    embedding as prefix; blocks.{i}; final norm + pooling + head as suffix."""
    if not (hasattr(model, "patch_embed") and isinstance(getattr(model, "blocks", None), nn.Sequential)
            and hasattr(model, "_pos_embed") and hasattr(model, "norm_pre") and hasattr(model, "forward_head")):
        return None

    def prefix(m, x):
        x = m.patch_embed(x)
        x = m._pos_embed(x)  # class/register tokens and position embedding (model parameters)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    return Split(Fn(model, prefix, _present(model, ["patch_embed", "pos_drop", "patch_drop", "norm_pre"])),
                 blocks, _head(model, ["attn_pool", "fc_norm", "head_drop", "head", "head_dist"], before=["norm"]))
