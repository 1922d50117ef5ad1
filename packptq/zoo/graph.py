"""Block discovery from the dataflow graph: the ``graph`` split rule, the general path for a
model no family rule knows.

The model is traced with ``torch.fx`` (symbolic tracing, in eval mode; ``torch.nn`` layers,
quantized layers and attention modules with a quantized replacement stay single call nodes).
A *cut* is a point of the execution order where a single tensor carries everything forward:
every value computed before it and used after it is that tensor (parameters, buffers and values
that do not depend on the input are not activations; they are read again where needed). Every
module call of the trace (a scope of ``nn_module_stack``) whose nodes are contiguous and start
and end at cuts is *closed*: running the module on the tensor at its start reproduces the
tensor at its end.

The region of the model is cut into pieces top-down: a closed module is replaced by the pieces
its own cuts make (its closed children, and runs of its own functional code) when at least one
of them is *composite*: a region with a branch inside (a residual add, a concatenation, an
attention, a channel split) holding at least one weight layer, or a block class (a module
with its own ``forward``, not a ``Sequential``) holding two or more. The blocks are the pieces
from the first composite piece to the last: composite pieces, weight layers between them (stage
glue, e.g. a downsampling conv or a patch merging) as blocks of their own, and weightless pieces
(a pooling, an activation in ``forward``) joined to the block before them. Everything before is
the prefix, everything after the suffix. A model without any composite piece (a plain chain of
layers: VGG, AlexNet) takes one block per weight layer with the weightless operations after it;
its first layer is the prefix, its last the suffix.

A block that is exactly one module call is that module; any other block is a ``GraphBlock``, a
module that holds (as registered children) the modules its part of the graph calls and runs that
part. Prefix and suffix are ``Fn`` views that run their part against the model at run time. The
traced graph is kept on the model (shared by its copies, which split the same way after BN
folding or layer quantization replace leaves by name)."""
from __future__ import annotations

import inspect
import linecache
import logging
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from packptq.zoo.split import SPLIT_RULES, Fn, Split, SplitError, check_split

log = logging.getLogger("packptq")

_GRAPH_ATTR = "_packptq_graph_layout"
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)
#: functions that multiply by a weight matrix when one of their arguments is a parameter
_MATMUL_NAMES = ("linear", "conv", "matmul", "mm", "einsum", "attention")


# -- tracing -------------------------------------------------------------------------------------
def _extra_leaves() -> tuple:
    """Module classes traced as single calls besides ``torch.nn``'s: quantized layers and the
    attention classes quantization replaces (the replacement must be called by the same node)."""
    from packptq.quant.convert import ATTENTION_CONVERTERS
    from packptq.quant.modules import QAttention, QuantLayer, QWindowAttention

    return (QuantLayer, QAttention, QWindowAttention) + tuple(ATTENTION_CONVERTERS)


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        funcs: list = []
        try:  # timm's own list of functions that symbolic tracing must not enter
            from timm.layers import _fx as timm_fx

            funcs = list(timm_fx.get_notrace_functions())
            self._timm_leaf = lambda m: timm_fx.is_notrace_module(type(m))
        except Exception:  # pragma: no cover - timm layout changed
            self._timm_leaf = lambda m: False
        super().__init__(autowrap_functions=tuple(funcs))
        self._leaves = _extra_leaves()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaves) or self._timm_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` (in eval mode) as an FX graph over its own modules; a model that cannot be traced
    is a one-line SplitError naming the construct that stopped the trace."""
    sig = inspect.signature(model.forward)
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    concrete = {p.name: p.default for p in params[1:] if p.default is not p.empty}
    was = model.training
    model.eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any failure of tracing is reported the same way
        raise SplitError(_trace_failure(model, exc)) from None
    finally:
        model.train(was)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _trace_failure(model: nn.Module, exc: BaseException) -> str:
    """One line: what stopped the trace, where (the last frame outside torch), what to do."""
    where = ""
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/torch/" not in fr.filename.replace("\\", "/"):
            code = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
            where = f" at {fr.filename}:{fr.lineno} `{code}`"
            break
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return (f"cannot trace {type(model).__name__} for block discovery: {type(exc).__name__}: {msg}{where}; "
            f"make that code independent of tensor values, or register a split rule for the model "
            f"(docs/splitting.md) and pass its name as family=/model.family=")


# -- the graph layout ----------------------------------------------------------------------------
class _Layout:
    """What the graph rule found on a model: the graph, tensor constants the trace created, and
    the parts (node names). Shared, not copied, by copies of the model (it holds no modules)."""

    def __init__(self, graph: fx.Graph, consts: Dict[str, torch.Tensor], prefix: List[str],
                 blocks: List[Tuple[str, List[str], Optional[str]]], suffix: List[str]) -> None:
        self.graph, self.consts = graph, consts
        self.prefix, self.blocks, self.suffix = prefix, blocks, suffix
        self.nodes = {n.name: n for n in graph.nodes}

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):  # a pickled model leaves the layout out (it is found again)
        return (type(None), ())


def _attr(root: nn.Module, target: str, consts: Dict[str, torch.Tensor]):
    if target in consts:
        return consts[target]
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run_part(nodes: Sequence[fx.Node], x: torch.Tensor, get_module: Callable[[str], nn.Module],
              root: nn.Module, consts: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the graph nodes ``nodes`` (in order) on ``x``, the value of the node before the first;
    attributes and input-independent values are computed where they are used."""
    env: Dict[fx.Node, object] = {}
    inside = set(nodes)
    last = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i

    def value(a: fx.Node):
        if a in env:
            return env[a]
        if a.op == "get_attr":
            v = _attr(root, a.target, consts)
        elif not _independent(a):
            if a in inside:
                raise RuntimeError(f"graph node {a.name} used after it was freed")
            return x  # the part's input: the only activation reaching it from outside
        else:
            v = _exec(a, map_arg(a.args, value), map_arg(a.kwargs, value), get_module)
        env[a] = v
        return v

    out = x
    for i, n in enumerate(nodes):
        out = _exec(n, map_arg(n.args, value), map_arg(n.kwargs, value), get_module)
        env[n] = out
        for a in n.all_input_nodes:  # free activations after their last use here
            if last.get(a) == i and a in inside:
                env.pop(a, None)
    return out


def _exec(n: fx.Node, args, kwargs, get_module):
    if n.op == "call_module":
        return get_module(n.target)(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    raise SplitError(f"graph node {n.name} ({n.op}) cannot run inside a part")


def _independent(n: fx.Node) -> bool:
    return bool(n.meta.get("packptq_const"))


class GraphBlock(nn.Module):
    """A block that is a part of the model's graph rather than one module: holds the modules its
    nodes call as registered children (``mods``, keyed by their dotted names with '/' for '.')
    and runs the nodes. ``names``: the dotted names of those modules in the model."""

    def __init__(self, model: nn.Module, layout: _Layout, nodes: List[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_layout", layout)
        self._nodes = [layout.nodes[n] for n in nodes]
        targets = list(dict.fromkeys(n.target for n in self._nodes if n.op == "call_module"))
        self.mods = nn.ModuleDict({t.replace(".", "/"): model.get_submodule(t) for t in targets})
        self.names = targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_part(self._nodes, x, lambda t: self.mods[t.replace(".", "/")], self._model, self._layout.consts)


def _view(model: nn.Module, layout: _Layout, nodes: List[str]) -> Fn:
    part = [layout.nodes[n] for n in nodes]
    names = list(dict.fromkeys(n.target for n in part if n.op == "call_module"))
    return Fn(model, lambda m, x: _run_part(part, x, m.get_submodule, m, layout.consts) if part else x, names)


def _build(model: nn.Module, layout: _Layout) -> Split:
    blocks = []
    for name, nodes, module in layout.blocks:
        blocks.append((name, model.get_submodule(module) if module is not None else GraphBlock(model, layout, nodes)))
    return Split(_view(model, layout, layout.prefix), blocks, _view(model, layout, layout.suffix))


# -- discovery -----------------------------------------------------------------------------------
@dataclass
class _Piece:
    lo: int  # first position (inclusive) in the execution order
    hi: int  # last position (inclusive)
    key: Optional[str] = None  # the module call (nn_module_stack key) it is, None for code
    path: Optional[str] = None  # that module's dotted name
    cls: Optional[type] = None


class _Graph:
    """The traced graph in execution order with cuts, weights and module-call scopes."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor) -> None:
        try:
            ShapeProp(gm).propagate(x)
        except Exception as exc:  # noqa: BLE001 - the model itself fails on this input
            cause = exc.__cause__ or exc
            raise SplitError(f"{gm.__class__.__name__} fails on the example input {tuple(x.shape)}: "
                             f"{' '.join(str(cause).split())[:200]}; give an input the model accepts") from None
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise SplitError(f"{gm.__class__.__name__}.forward takes no input")
        inp = placeholders[0]
        dep = {inp}
        for n in gm.graph.nodes:
            if n.op in ("call_module", "call_function", "call_method") and any(a in dep for a in n.all_input_nodes):
                dep.add(n)
            elif n.op in ("call_module", "call_function", "call_method"):
                n.meta["packptq_const"] = True
        self.order = [inp] + [n for n in gm.graph.nodes if n in dep and n is not inp]
        pos = {n: i for i, n in enumerate(self.order)}
        out = next(n for n in gm.graph.nodes if n.op == "output")
        self.result = out.args[0]
        if not isinstance(self.result, fx.Node) or not _is_tensor(self.result):
            raise SplitError(f"{type(gm).__name__}.forward returns {type(self.result).__name__}, not one tensor; "
                             f"wrap the model so that it returns its logits")
        n_pos = len(self.order)
        last_use = []
        for n in self.order:
            users = [pos[u] for u in n.users if u in pos] + ([n_pos] if n in out.all_input_nodes else [])
            last_use.append(max(users, default=pos[n]))
        self.cut, self.single = [], []
        reach = treach = -1  # the furthest use of any value (any tensor) before position i
        for i, n in enumerate(self.order):
            self.cut.append(reach <= i and _is_tensor(n) and (last_use[i] > i or n is self.result))
            self.single.append(treach <= i)  # one tensor live (sizes and other numbers aside)
            reach = max(reach, last_use[i])
            if _is_tensor(n):
                treach = max(treach, last_use[i])
        self.stack = [list((n.meta.get("nn_module_stack") or {}).items()) for n in self.order]
        self.stack[0] = []
        mods = dict(gm.named_modules())
        self.weighted = [self._weighted(n, mods) for n in self.order]
        # module calls: key -> (positions, path, class)
        self.calls: Dict[str, list] = {}
        for i, st in enumerate(self.stack):
            for key, (path, cls) in st:
                self.calls.setdefault(key, [[], path, cls])[0].append(i)

    @staticmethod
    def _weighted(n: fx.Node, mods: Dict[str, nn.Module]) -> bool:
        if n.op == "call_module":
            m = mods.get(n.target)
            return isinstance(m, _WEIGHT_LAYERS + _extra_leaves())
        # a function on a weight matrix (F.linear, F.conv2d, x @ W, a fused attention)
        fname = getattr(n.target, "__name__", str(n.target)).lower()
        return n.op == "call_function" and any(k in fname for k in _MATMUL_NAMES) and any(
            a.op == "get_attr" and isinstance(a.meta.get("tensor_meta"), TensorMetadata)
            and len(a.meta["tensor_meta"].shape) >= 2 for a in n.all_input_nodes)

    def closed(self, key: str) -> bool:
        ps = self.calls[key][0]
        lo, hi = ps[0], ps[-1]
        return hi - lo + 1 == len(ps) and self.cut[lo - 1] and self.cut[hi]

    def branch(self, p: _Piece) -> bool:
        """Two tensors live at once somewhere inside ``p`` (a residual, a concatenation, ...)."""
        return any(not self.single[i] for i in range(p.lo, p.hi))

    def n_weighted(self, p: _Piece) -> int:
        return sum(self.weighted[p.lo:p.hi + 1])

    def composite(self, p: _Piece) -> bool:
        w = self.n_weighted(p)
        if w >= 1 and self.branch(p):
            return True
        return _block_class(p.cls) and w >= 2

    def expand(self, p: _Piece, depth: int, root: bool = False) -> List[_Piece]:
        """``p`` as the pieces its own cuts make, expanded in turn, when that finds repeated
        structure (two or more composite pieces; the root is always expanded), else ``[p]``."""
        if p.key is not None and self.order[p.lo].op == "call_module" and p.lo == p.hi \
                and self.stack[p.lo][-1][0] == p.key:
            return [p]  # a leaf call
        kids: Dict[str, Tuple[int, int]] = {}
        for i in range(p.lo, p.hi + 1):
            st = self.stack[i]
            if len(st) > depth:
                key = st[depth][0]
                if key in kids:
                    kids[key] = (kids[key][0], i)
                else:
                    kids[key] = (i, i)
        closed = {k: r for k, r in kids.items() if self.closed(k)}
        inside = set()
        for lo, hi in closed.values():
            inside.update(range(lo, hi))
        segs, start = [], p.lo
        for i in range(p.lo, p.hi + 1):
            if i == p.hi or (self.cut[i] and i not in inside):
                segs.append((start, i))
                start = i + 1
        if len(segs) == 1 and not any(r == segs[0] for r in closed.values()):
            return [p]  # no cut at this level
        single = len(segs) == 1  # one child module is all of p: p is whatever it is
        out: List[_Piece] = []
        by_range = {r: k for k, r in closed.items()}
        for lo, hi in segs:
            k = by_range.get((lo, hi))
            if k is not None:
                _, path, cls = self.calls[k]
                out += self.expand(_Piece(lo, hi, k, path, cls), depth + 1)
            else:
                out.append(_Piece(lo, hi))
        if root:
            return out
        if single:  # the child is all of p: keep the block class's name over a container's
            return [p] if len(out) == 1 and _block_class(p.cls) and not _block_class(out[0].cls) else out
        # repeated structure below p, and p's own code is only glue between its pieces (a
        # transformer block's two residual halves stay one block)
        if sum(self.composite(q) for q in out) >= 2 and not any(q.key is None and self.composite(q) for q in out):
            return out
        return [p]

    def names(self, lo: int, hi: int) -> List[str]:
        return [n.name for n in self.order[lo:hi + 1]]

    def label(self, pieces: List[_Piece], depth_hint: int = 0) -> str:
        """A readable, unique name for a block made of ``pieces``."""
        parts: List[str] = []
        for q in pieces:
            if q.path is not None:
                parts.append(q.path)
                continue
            # code: the outermost module calls it makes, else its function nodes
            common = None
            for i in range(q.lo, q.hi + 1):
                st = [k for k, _ in self.stack[i]]
                common = st if common is None else [a for a, b in zip(common, st) if a == b]
            lvl = len(common or [])
            seen: List[str] = []
            for i in range(q.lo, q.hi + 1):
                st = self.stack[i]
                if len(st) > lvl:  # the module calls it makes (a second call of one: name#1)
                    nm = st[lvl][0].replace("@", "#")
                    if nm not in seen:
                        seen.append(nm)
            parts += seen
        parts = list(dict.fromkeys(parts)) or [self.order[pieces[0].lo].name]  # code alone: its first function
        return "+".join(parts) if len(parts) <= 3 else f"{parts[0]}..{parts[-1]}"


def _is_tensor(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("tensor_meta"), TensorMetadata)


def _block_class(cls: Optional[type]) -> bool:
    """A module class with its own forward (not a container, not a library layer)."""
    return cls is not None and not issubclass(cls, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) \
        and not _is_leaf_class(cls)


def _is_leaf_class(cls: type) -> bool:
    return cls.__module__.startswith("torch.nn") or issubclass(cls, _extra_leaves())


def _plan(g: _Graph, model_name: str) -> Tuple[List[str], List[Tuple[str, List[str], Optional[str]]], List[str]]:
    top = _Piece(1, len(g.order) - 1, None, "", type(g.gm))
    if len(g.order) < 2:
        raise SplitError(f"{model_name}.forward computes nothing from its input")
    pieces = g.expand(top, 0, root=True)
    if not any(g.composite(q) for q in pieces):
        return _chain_plan(g, model_name)
    comp = [i for i, q in enumerate(pieces) if g.composite(q)]
    # a one-off region of code at either end (a ViT's class token and position embedding) is
    # stem or head when module blocks exist
    mod_comp = [i for i in comp if pieces[i].key is not None]
    comp = mod_comp or comp
    first, last = comp[0], comp[-1]
    groups: List[List[_Piece]] = []
    for q in pieces[first:last + 1]:
        if g.n_weighted(q) or not groups:
            groups.append([q])
        else:
            groups[-1].append(q)  # weightless glue joins the block before it
    blocks = []
    for grp in groups:
        lo, hi = grp[0].lo, grp[-1].hi
        module = grp[0].path if len(grp) == 1 and grp[0].key is not None and "@" not in grp[0].key else None
        blocks.append((module if module else g.label(grp), g.names(lo, hi), module or None))
    pre = g.names(1, pieces[first].lo - 1)
    suf = g.names(pieces[last].hi + 1, len(g.order) - 1)
    return pre, _unique(blocks), suf


def _chain_plan(g: _Graph, model_name: str):
    """No composite region: one block per weight layer (with the weightless code after it)."""
    atoms, start = [], 1
    for i in range(1, len(g.order)):
        if g.cut[i]:
            atoms.append(_Piece(start, i))
            start = i + 1
    groups: List[List[_Piece]] = []
    for a in atoms:
        if g.n_weighted(a) and (not groups or g.n_weighted(_Piece(groups[-1][0].lo, groups[-1][-1].hi))):
            groups.append([a])
        elif not groups:
            groups.append([a])
        else:
            groups[-1].append(a)
    if len(groups) < 3:
        layers = [n.target for n, w in zip(g.order, g.weighted) if w and n.op == "call_module"]
        raise SplitError(f"graph rule: no repeated blocks in {model_name}: no residual/branching region, and "
                         f"{len(layers)} weight layers {layers[:6]} are too few for a stem, blocks and a head")
    mid = []
    for grp in groups[1:-1]:
        lo, hi = grp[0].lo, grp[-1].hi
        calls = [n.target for n in g.order[lo:hi + 1] if n.op == "call_module"]
        lead = next((c for c, w in zip(g.order[lo:hi + 1], g.weighted[lo:hi + 1]) if w), g.order[lo])
        name = lead.target if lead.op == "call_module" else lead.name
        module = name if calls == [name] and lead.op == "call_module" and hi == lo else None
        mid.append((name, g.names(lo, hi), module))
    pre = g.names(1, groups[0][-1].hi)
    suf = g.names(groups[-1][0].lo, len(g.order) - 1)
    return pre, _unique(mid), suf


def _unique(blocks):
    seen: Dict[str, int] = {}
    out = []
    for name, nodes, module in blocks:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append((name if k == 0 else f"{name}#{k}", nodes, module))
    return out


def discover(model: nn.Module, x: torch.Tensor) -> _Layout:
    """The graph layout of ``model`` on the example input ``x`` (a batch it accepts)."""
    gm = trace(model)
    consts = {n.target: _attr(gm, n.target, {}) for n in gm.graph.nodes
              if n.op == "get_attr" and not _resolves(model, n.target)}
    with torch.no_grad():
        g = _Graph(gm, x)
    pre, blocks, suf = _plan(g, type(model).__name__)
    return _Layout(gm.graph, consts, pre, blocks, suf)


def _resolves(model: nn.Module, target: str) -> bool:
    try:
        _attr(model, target, {})
        return True
    except AttributeError:
        return False


@SPLIT_RULES.register("graph")
def _graph_rule(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> Split:
    """Any traceable model: blocks from its dataflow graph (the module docstring)."""
    layout = getattr(model, _GRAPH_ATTR, None)
    if layout is not None:
        return _build(model, layout)
    from packptq.zoo.families import guess_input

    x = example_input if example_input is not None else guess_input(model)
    was = model.training
    model.eval()
    try:
        layout = discover(model, x)
        split = _build(model, layout)
        try:
            check_split(model, split, x)
        except SplitError:
            # a module block whose call took more than its input: run every block as graph
            layout.blocks = [(name, nodes, None) for name, nodes, _ in layout.blocks]
            split = _build(model, layout)
            try:
                check_split(model, split, x)
            except SplitError as exc:
                raise SplitError(f"graph rule: {exc}; it found {len(layout.blocks)} blocks "
                                 f"{[b[0] for b in layout.blocks][:6]}") from None
    finally:
        model.train(was)
    object.__setattr__(model, _GRAPH_ATTR, layout)
    _warn_functional_weights(model, layout)
    return split


def _warn_functional_weights(model: nn.Module, layout: _Layout) -> None:
    """Weight matrices used by functions rather than by calling their Conv/Linear module are not
    quantized (quantization replaces modules that run)."""
    called = {n.target for n in layout.graph.nodes if n.op == "call_module"}
    mats = []
    for n in layout.graph.nodes:
        if n.op != "get_attr" or n.target in layout.consts:
            continue
        v = _attr(model, n.target, {})
        if isinstance(v, nn.Parameter) and v.dim() >= 2 and n.target.rpartition(".")[0] not in called:
            mats.append(n.target)
    if mats:
        log.info("graph rule: %d weight matrices are used by functions, not by Conv/Linear modules, and stay in "
                 "floating point: %s", len(mats), mats[:6])


def block_paths(split: Split) -> List[List[str]]:
    """For each block of ``split``, the dotted module names it runs (its own name for a module)."""
    return [list(b.names) if isinstance(b, GraphBlock) else [n] for n, b in split.blocks]

