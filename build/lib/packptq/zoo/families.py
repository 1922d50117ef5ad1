"""Split rules for the CNN and Swin families, and the ``generic`` rule for other timm models.

Every rule returns ``None`` for a model that is not its family (``split_model`` then tries the
next one). Block names are dotted module paths, e.g. ``blocks.3.0``, ``s2.b1``,
``layers.1.downsample``."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from packptq.zoo.split import SPLIT_RULES, Fn, Split, SplitError, _head, _seq, check_split


# -- EfficientNet-style layout (timm's EfficientNet class): MobileNetV2, MNASNet -----------------
def _arch(model: nn.Module) -> str:
    """timm's architecture name of ``model`` ('' if it was not built by timm)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture", "") or "")


def _effnet_style(model: nn.Module) -> Split | None:
    if not (all(hasattr(model, a) for a in ("conv_stem", "bn1", "conv_head", "bn2", "forward_head"))
            and isinstance(getattr(model, "blocks", None), nn.Sequential)):
        return None
    stem = ["conv_stem", "bn1"]
    blocks = [(f"blocks.{i}.{j}", b) for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)]
    return Split(Fn(model, _seq(stem), stem), blocks,
                 _head(model, ["global_pool", "classifier"], before=["conv_head", "bn2"]))


@SPLIT_RULES.register("mobilenetv2")
def _mobilenetv2(model: nn.Module) -> Split | None:
    """mobilenetv2_*: stem conv_stem/bn1; each DepthwiseSeparable/InvertedResidual in
    ``blocks[i][j]``; suffix conv_head/bn2/global_pool/classifier. Other models of timm's
    EfficientNet class (efficientnet_*, ...) are left to their own rule or ``generic``."""
    arch = _arch(model)
    if arch and not arch.startswith("mobilenetv2"):
        return None
    return _effnet_style(model)


@SPLIT_RULES.register("mnasnet")
def _mnasnet(model: nn.Module) -> Split | None:
    """mnasnet_* / semnasnet_*: the same layout as MobileNetV2 in timm."""
    if "mnasnet" not in _arch(model):
        return None
    return _effnet_style(model)


# -- RegNet --------------------------------------------------------------------------------------
@SPLIT_RULES.register("regnet")
def _regnet(model: nn.Module) -> Split | None:
    """regnetx/y_*: stem; each stage's blocks ``s{k}.b{i}``; suffix final_conv + head."""
    if not all(hasattr(model, a) for a in ("stem", "s1", "final_conv", "head", "forward_head")):
        return None
    stages = []
    while hasattr(model, f"s{len(stages) + 1}"):
        stages.append(f"s{len(stages) + 1}")
    blocks = [(f"{s}.{n}", b) for s in stages for n, b in model.get_submodule(s).named_children()]
    return Split(Fn(model, _seq(["stem"]), ["stem"]), blocks, _head(model, ["head"], before=["final_conv"]))


# -- Swin ----------------------------------------------------------------------------------------
@SPLIT_RULES.register("swin")
def _swin(model: nn.Module) -> Split | None:
    """Swin (timm >= 0.9 layout, NHWC): prefix patch_embed; blocks: every SwinTransformerBlock
    ``layers.{i}.blocks.{j}``, and the PatchMerging ``layers.{i}.downsample`` that *starts*
    stage i >= 1 as a block of its own; suffix norm + head."""
    layers = getattr(model, "layers", None)
    if not (hasattr(model, "patch_embed") and isinstance(layers, nn.Sequential) and len(layers) > 0
            and all(hasattr(st, "downsample") and isinstance(getattr(st, "blocks", None), nn.Sequential)
                    for st in layers)
            and hasattr(model, "norm") and hasattr(model, "forward_head")):
        return None
    if getattr(model, "absolute_pos_embed", None) is not None:
        return None  # the ape variant adds a parameter between patch_embed and the layers
    blocks: List[Tuple[str, nn.Module]] = []
    for i, st in enumerate(layers):
        if not isinstance(st.downsample, nn.Identity):
            blocks.append((f"layers.{i}.downsample", st.downsample))
        blocks += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(st.blocks)]
    return Split(Fn(model, _seq(["patch_embed"]), ["patch_embed"]), blocks, _head(model, ["head"], before=["norm"]))


# -- generic -------------------------------------------------------------------------------------
# The layout the generic rule found on a model is stored on it, so copies of the model (deep
# copies with BN folded or layers quantized, whose leaf modules differ) split the same way.
_LAYOUT_ATTR = "_packptq_generic_layout"


@SPLIT_RULES.register("generic")
def _generic(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> Split:
    """Any model whose feature extractor is a sequential run of its children, some of them
    (nested) sequences of repeated blocks: ResNet-D, EfficientNet, ConvNeXt, RegNet, Swin, ...

    The model is traced once on ``example_input`` (or a guessed input, see ``guess_input``):
    containers (``nn.Sequential``, stages holding them) are expanded into their children when
    running the children in call order reproduces the container's output; Identity modules are
    dropped. The body is the top-level part with the most expanded modules, widened to its
    neighbours of the same block classes; everything in the body is a block (stage glue such
    as a downsample layer becomes a block of its own). The composed split is verified on the
    input; failure raises SplitError naming what was found."""
    layout = getattr(model, _LAYOUT_ATTR, None)
    if layout is None:
        x = example_input if example_input is not None else guess_input(model)
        # Trace a copy with perturbed weights: at timm's initialisation some residual branches
        # are exactly zero (zero-init last BN, layer scale), which makes a block look like a
        # plain sequence of its layers.
        layout = _discover(_perturbed(model), x)
        split = _build(model, layout)
        _check_or_explain(model, split, x, layout)
        object.__setattr__(model, _LAYOUT_ATTR, layout)
        return split
    return _build(model, layout)


@torch.no_grad()
def _perturbed(model: nn.Module) -> nn.Module:
    probe = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for p in probe.parameters():
        scale = 0.1 * p.abs().mean().item() + 1e-2
        p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return probe


def guess_input(model: nn.Module) -> torch.Tensor:
    """A [1, C, H, W] input for ``model``: C from its first Conv2d, H = W from its patch
    embedding's ``img_size`` or timm's ``pretrained_cfg['input_size']`` (224 otherwise)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise SplitError(f"cannot guess an input for {type(model).__name__} (no Conv2d); "
                         f"pass split_model(..., example_input=x)")
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = ((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))[1:]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(1, conv.in_channels, h, w, generator=torch.Generator().manual_seed(0)).to(conv.weight)


_Layout = Dict[str, object]  # prefix, blocks, suffix: lists of names; head: names or None


def _build(model: nn.Module, layout: _Layout) -> Split:
    blocks = [(n, model.get_submodule(n)) for n in layout["blocks"]]
    prefix = Fn(model, _seq(layout["prefix"]), layout["prefix"])
    if layout["head"] is None:
        suffix = Fn(model, _seq(layout["suffix"]), layout["suffix"])
    else:
        suffix = _head(model, layout["head"], before=layout["suffix"])
    return Split(prefix, blocks, suffix)


def _check_or_explain(model: nn.Module, split: Split, x: torch.Tensor, layout: _Layout) -> None:
    try:
        check_split(model, split, x)
    except SplitError as exc:
        raise SplitError(f"generic rule: {exc}; it found prefix {layout['prefix']}, {len(layout['blocks'])} "
                         f"blocks {_abbrev(layout['blocks'])}, suffix {layout['suffix']}") from None


def _abbrev(names: List[str], k: int = 4) -> str:
    return str(names) if len(names) <= 2 * k else f"[{', '.join(names[:k])}, ..., {', '.join(names[-k:])}]"


def _repeated(model: nn.Module) -> str:
    """'name (n x Class)' for the largest containers of composite modules, for error messages."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            kids = [c for c in m.children() if _composite(c)]
            if len(kids) >= 2:
                cls = Counter(type(c).__name__ for c in kids).most_common(1)[0][0]
                found.append((len(kids), f"{name} ({len(kids)} x {cls})"))
    found.sort(key=lambda t: -t[0])
    return ", ".join(s for _, s in found[:3]) or "none"


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _composite(m: nn.Module) -> bool:
    """Built from parameterised submodules (a block, a ConvNormAct), unlike a layer whose
    children are parameter-free (Conv2d, timm's BatchNormAct2d)."""
    return any(_has_params(c) for c in m.children())


def _block_like(m: nn.Module) -> bool:
    """Built from composite submodules (a residual block, as opposed to a ConvNormAct)."""
    return any(_composite(c) for c in m.children())


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _stage_like(m: nn.Module) -> bool:
    """A non-Sequential module that holds repeated blocks: a Sequential/ModuleList child of
    composite modules, or a block-like child (RegNet's s1.b1). Whether it really is a stage is
    decided by running it (``_runs_as``)."""
    return any((isinstance(c, (nn.Sequential, nn.ModuleList)) and any(_composite(g) for g in c.children()))
               or _block_like(c) for c in m.children())


class _Trace:
    """Call order and call count of every module during one run; the first (single-tensor)
    input and output of the modules in ``watch``."""

    def __init__(self, model: nn.Module, watch: set) -> None:
        self.order: Dict[nn.Module, int] = {}
        self.count: Counter = Counter()
        self.io: Dict[nn.Module, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.single: Dict[nn.Module, bool] = {}
        self._handles = []
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            if m in watch:
                self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))

    def _pre(self, m, args, kwargs):
        self.order.setdefault(m, len(self.order))
        self.count[m] += 1
        ok = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        self.single[m] = self.single.get(m, True) and ok

    def _post(self, m, args, kwargs, out):
        if m not in self.io and self.single.get(m) and isinstance(out, torch.Tensor):
            self.io[m] = (args[0].detach().clone(), out.detach().clone())

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())


def _runs_as(mods: List[Tuple[str, nn.Module]], x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether running ``mods`` in turn on ``x`` gives ``ref`` (mods in eval mode)."""
    h = x.clone()
    try:
        for _, c in mods:
            h = c(h)
    except Exception:  # shapes that do not chain: not a sequential run
        return False
    return isinstance(h, torch.Tensor) and _close(h, ref)


def _called_in_order(trace: _Trace, kids: List[Tuple[str, nn.Module]],
                     all_weights: bool = True) -> Optional[List[Tuple[str, nn.Module]]]:
    """Children that ran, in call order (a ModuleList, or a Sequential the parent loops over
    instead of calling, stands for its items). None if one ran more than once or not with a
    single tensor, or (``all_weights``) if a child with parameters did not run as a module."""
    flat: List[Tuple[str, nn.Module]] = []

    def add(name: str, m: nn.Module) -> None:
        if isinstance(m, nn.ModuleList) or (isinstance(m, nn.Sequential) and trace.count[m] == 0):
            for n, c in m.named_children():
                add(f"{name}.{n}", c)
        else:
            flat.append((name, m))

    for n, c in kids:
        add(n, c)
    ran = [(n, c) for n, c in flat if trace.count[c] > 0]
    if any(trace.count[c] != 1 or not trace.single.get(c) for _, c in ran):
        return None
    if all_weights and any(trace.count[c] == 0 and _has_params(c) for _, c in flat):
        return None
    return sorted(ran, key=lambda t: trace.order[t[1]])


def _outermost_called(model: nn.Module, trace: _Trace) -> List[str]:
    """Names of the modules that ran, without those inside another that ran, in call order
    (a head may call ``head.norm`` directly rather than ``head``)."""
    ran = [(n, m) for n, m in model.named_modules() if n and trace.count[m]]
    names = {n for n, _ in ran}
    outer = [(n, m) for n, m in ran if not any(n.startswith(o + ".") for o in names)]
    return [n for n, _ in sorted(outer, key=lambda t: trace.order[t[1]])]


@torch.no_grad()
def _discover(model: nn.Module, x: torch.Tensor) -> _Layout:
    name = type(model).__name__
    has_head = callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
    watch = {m for m in model.modules() if not _plain_sequential(m) and _stage_like(m)}
    was = model.training
    model.eval()
    trace = _Trace(model, watch)
    try:
        if has_head:
            feats = model.forward_features(x)
            trace.close()
            head_trace = _Trace(model, set())
            try:
                out = model.forward_head(feats)
            finally:
                head_trace.close()
            if not _close(out, model(x)):
                raise SplitError(f"generic rule: {name}(x) is not forward_head(forward_features(x))")
            head_names = _outermost_called(model, head_trace)
            root_out = feats
        else:
            root_out = model(x)
            trace.close()
            head_names = None
    finally:
        trace.close()
        model.train(was)

    if not isinstance(root_out, torch.Tensor):
        raise SplitError(f"generic rule: {name}'s features are a {type(root_out).__name__}, not a tensor")
    top = _called_in_order(trace, list(model.named_children()), all_weights=False)  # the head is not run
    what = "forward_features" if has_head else "forward"
    if top is None or not top:
        raise SplitError(f"generic rule: {name}.{what} calls its children more than once or with several "
                         f"arguments; repeated modules in it: {_repeated(model)}")
    model.eval()
    try:
        sequential = _runs_as(top, x, root_out)
    finally:
        model.train(was)
    if not sequential:
        raise SplitError(f"generic rule: {name}.{what} is not the sequential run of its children "
                         f"{[n for n, _ in top]} (it does more than call them in turn); repeated modules in "
                         f"it: {_repeated(model)}. Add a rule to packptq.zoo.SPLIT_RULES")

    def expand(prefix: str, m: nn.Module) -> List[Tuple[str, nn.Module]]:
        kids = [(f"{prefix}.{n}", c) for n, c in m.named_children()]
        if _plain_sequential(m):
            if any(_composite(c) for _, c in kids):
                return [it for n, c in kids for it in expand(n, c)]
            return [(prefix, m)]
        if m in trace.io:  # a stage: expand if its children, run in call order, reproduce it
            ran = _called_in_order(trace, kids)
            if ran and _runs_as(ran, *trace.io[m]):
                return [it for n, c in ran for it in expand(n, c)]
        return [(prefix, m)]

    model.eval()
    try:
        items = [it for n, c in top for it in expand(n, c) if not isinstance(it[1], nn.Identity)]
    finally:
        model.train(was)
    # groups: runs of items under one top-level child (a looped-over ModuleList is one group)
    groups: List[Tuple[str, list]] = []
    for it in items:
        g = it[0].split(".")[0]
        if groups and groups[-1][0] == g:
            groups[-1][1].append(it)
        else:
            groups.append((g, [it]))

    expanded = [k for k, (g, its) in enumerate(groups) if len(its) > 1 or its[0][0] != g]
    if expanded:
        main = max(expanded, key=lambda k: len(groups[k][1]))
        classes = {type(c) for _, c in groups[main][1]}
        lo = hi = main
        while lo - 1 in expanded and classes & {type(c) for _, c in groups[lo - 1][1]}:
            lo -= 1
        while hi + 1 in expanded and classes & {type(c) for _, c in groups[hi + 1][1]}:
            hi += 1
        start = sum(len(its) for _, its in groups[:lo])
        stop = sum(len(its) for _, its in groups[:hi + 1])
    else:  # repeated blocks directly under the model: the longest run of one composite class
        start = stop = 0
        i = 0
        while i < len(items):
            j = i
            while j < len(items) and _composite(items[i][1]) and type(items[j][1]) is type(items[i][1]):
                j += 1
            if j - i > stop - start:
                start, stop = i, j
            i = max(j, i + 1)
    while start < stop and not _composite(items[start][1]):  # plain stem layers stay in the prefix
        start += 1
    while stop > start and not _composite(items[stop - 1][1]):  # and a final norm in the suffix
        stop -= 1
    body = items[start:stop]
    if len(body) < 2 or not any(_composite(c) for _, c in body):
        raise SplitError(f"generic rule: no repeated blocks in {name}; its {what} runs "
                         f"{[n for n, _ in items]}; repeated modules in it: {_repeated(model)}")
    return {"prefix": [n for n, _ in items[:start]], "blocks": [n for n, _ in body],
            "suffix": [n for n, _ in items[stop:]], "head": head_names}
