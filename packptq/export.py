"""Deployable artefacts of a quantized model.

``pt``: a self-contained checkpoint (``save_quantized`` / ``load_quantized``). Every quantized
layer's weight is stored as its integer codes k in 0..2^b-1, packed in the smallest container of
1, 2, 4 or 8 bits that holds b bits (8 / c codes per byte, first code in the lowest bits: a
2-bit code takes 2 bits, a 3-bit one 4) with its per-output-channel scale and zero point (the
weight is (k - zp) * scale); the activation quantizers' parameters (uniform: scale, zero point,
bits; log-sqrt(2): scale, bits), the parameters that stay in floating point (biases, norms,
embeddings, position tables) and the recipe that rebuilds the architecture (model config for
the zoo builder, dataset meta, quantization config, example input shape) travel with them.
``load_quantized`` needs neither the run directory nor the FP weights.

``onnx``: QuantizeLinear/DequantizeLinear (opset 17), with the sha256 of the graph in the
model's metadata (``packptq_sha256``, checked by ``check_onnx`` / ``onnx_predict``). Weights
are uint8 initialisers of their
integer codes followed by a per-axis DequantizeLinear; every activation quantizer becomes a
QuantizeLinear -> DequantizeLinear pair in uint8, followed for b < 8 by a Clip to the
dequantized ends of 0..2^b-1, which is the same as clamping the integers. The log-sqrt(2)
softmax quantizer has no exact standard-operator form and is refused (``ExportError``)."""
from __future__ import annotations

import errno
import hashlib
import os
import types
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from packptq.config import ConfigError, RunFailure
from packptq.evaluate import forward_all
from packptq.quant import QuantConfig, quantize_model
from packptq.quant.modules import QuantLayer
from packptq.quant.quantizer import ActQuantizer, LogSqrt2Quantizer, UniformQuantizer, WeightQuantizer
from packptq.zoo.build import ModelConfig, build_model, resolved_config

FORMAT = "packptq-quantized"
VERSION = 2  # 2: content digest, quantization config and example shape outside the recipe
OPSET = 17
FORMATS = ("pt", "onnx")


class ExportError(ConfigError):
    """A model or format that cannot be exported faithfully."""


# ----------------------------------------------------------------------------- integer codes
def container_bits(bits: int) -> int:
    """The smallest of 1, 2, 4, 8 bits that holds a ``bits``-bit code."""
    return next(c for c in (1, 2, 4, 8) if c >= bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes -> a flat uint8 tensor with 8 // c codes per byte, c = ``container_bits(bits)``,
    the first code in the lowest bits."""
    c = container_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    per = 8 // c
    if flat.numel() % per:
        flat = torch.cat([flat, flat.new_zeros(per - flat.numel() % per)])
    flat = flat.view(-1, per)
    out = torch.zeros(len(flat), dtype=torch.uint8)
    for j in range(per):
        out |= flat[:, j] << (j * c)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    c = container_bits(bits)
    per, mask = 8 // c, (1 << c) - 1
    n = int(torch.Size(shape).numel())
    out = torch.stack([(packed >> (j * c)) & mask for j in range(per)], dim=1).reshape(-1)
    return out[:n].reshape(shape)


def weight_codes(layer: QuantLayer) -> torch.Tensor:
    """The integer weight codes (uint8) the layer computes with (hard rounding if AdaRound ran)."""
    return layer.wq.integer_weight(layer.layer.weight.detach()).to(torch.uint8)


def _dequant(codes: torch.Tensor, wq: WeightQuantizer) -> torch.Tensor:
    s, z = wq._sz(codes)
    return (codes.to(s.dtype) - z) * s


# ----------------------------------------------------------------------------- pt format
def recipe(model_cfg: ModelConfig, meta: dict, qcfg: QuantConfig, example_shape) -> dict:
    """How to rebuild the architecture: the zoo builder's config (without weight sources; a
    checkpoint's shapes resolved), the dataset meta, the quantization config and the shape of an example input batch."""
    model_cfg, meta = resolved_config(model_cfg, meta)
    return {"builder": model_cfg.name, "model": asdict(model_cfg), "meta": meta, "quant": asdict(qcfg),
            "example_shape": list(example_shape)}


def quantized_state(qmodel: nn.Module, rec: Optional[dict] = None) -> dict:
    """The pt checkpoint of ``qmodel`` (a dict, see the module docstring), its digest included."""
    layers, skip = {}, set()
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            codes = weight_codes(m)
            layers[name] = {"bits": m.wq.bits, "shape": list(codes.shape), "codes": pack_codes(codes.cpu(), m.wq.bits),
                            "container_bits": container_bits(m.wq.bits)}
            skip.update({f"{name}.layer.weight", f"{name}.wq.alpha"})
    state = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items() if k not in skip}
    attrs = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            attrs[name] = {"act_enabled": m.act_enabled}
        elif isinstance(m, WeightQuantizer):
            attrs[name] = {"bits": m.bits, "enabled": m.enabled}
        elif isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            attrs[name] = {"bits": m.bits, "enabled": m.enabled}
    qcfg = getattr(qmodel, "packptq_quant_cfg", None)
    shape = getattr(qmodel, "packptq_example_shape", None) or (rec or {}).get("example_shape")
    ck = {"format": FORMAT, "version": VERSION, "recipe": rec, "layers": layers, "state": state, "attrs": attrs,
          "quant": asdict(qcfg) if qcfg is not None else (rec or {}).get("quant"),
          "example_shape": None if shape is None else [int(v) for v in shape]}
    ck["digest"] = digest(ck)
    return ck


def digest(ck: dict) -> str:
    """sha256 over the content of a checkpoint dict (every entry but ``digest``): keys, plain
    values, and each tensor's dtype, shape and bytes."""
    h = hashlib.sha256()

    def feed(o) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                if k == "digest" and o is ck:
                    continue
                h.update(repr(k).encode())
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    feed(ck)
    return h.hexdigest()


def _nonfinite(named) -> Optional[str]:
    """The first name whose floating-point tensor holds a NaN or an infinity, else None."""
    return next((k for k, v in named if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                 and not bool(torch.isfinite(v).all())), None)


def _check_quantized(qmodel) -> None:
    if not isinstance(qmodel, nn.Module):
        raise ExportError(f"qmodel is a {type(qmodel).__name__}, not a quantized torch module (the first value "
                          "packptq.quantize returns)")
    if not any(isinstance(m, QuantLayer) for m in qmodel.modules()):
        raise ExportError(f"{type(qmodel).__name__} has no quantized layer; export the module packptq.quantize "
                          "returns, not the FP model")
    bad = _nonfinite(qmodel.state_dict().items())
    if bad is not None:
        raise ExportError(f"the quantized model holds non-finite values in {bad}; it cannot be exported (quantize "
                          "the model again)")


def _atomic_write(path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename onto ``path``; the temporary file is removed on every error.
    A path that cannot be written is an ExportError; another OS error (a full disk) a RunFailure
    naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give the file to write (e.g. {path / 'quantized.pt'})")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ExportError(f"cannot write {path}: {blocking} is a file, not a folder; choose another path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder cannot hold it either
            pass
        if isinstance(exc, RuntimeError) and "open file failed" in str(exc):  # torch.save's own open
            why = str(exc).rpartition("strerror:")[2].strip() or "cannot open"
            raise ExportError(f"cannot write {path}: {why}; choose a writable file path") from None
        if isinstance(exc, OSError):
            why = exc.strerror or str(exc).splitlines()[0]
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT,
                             errno.EEXIST):
                raise ExportError(f"cannot write {path}: {why}; choose a writable file path") from None
            raise RunFailure(f"cannot write {path}: {why} (errno {exc.errno}); nothing was left there") from None
        if isinstance(exc, RuntimeError) and "PytorchStreamWriter" in str(exc):  # torch.save's OSError
            raise RunFailure(f"cannot write {path}: {str(exc).splitlines()[0]}; nothing was left there") from None
        raise
    return path


def save_quantized(qmodel: nn.Module, path, recipe: Optional[dict] = None) -> Path:
    """Write the quantized module ``qmodel`` (from ``packptq.quantize`` or a run) to ``path``:
    integer weight codes, scales and zero points, activation quantizer state, the other
    parameters, and a sha256 digest of the content that ``load_quantized`` verifies. With a zoo
    ``recipe`` (``packptq-export``) the file rebuilds its own architecture; without one,
    ``load_quantized(path, model=...)`` rebuilds it onto a fresh instance of the caller's
    class. Written atomically: a failed save leaves no file behind."""
    _check_quantized(qmodel)
    ck = quantized_state(qmodel, recipe)
    if ck["quant"] is None or ck["example_shape"] is None:
        raise ExportError(f"{type(qmodel).__name__} carries no quantization config; save the module "
                          "packptq.quantize returns")
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch names the records "archive/...", not after the temp file
            torch.save(ck, f)

    return _atomic_write(path, write)


def rebuild(rec: dict) -> nn.Module:
    """The quantized architecture of a recipe, with uninitialised quantizers and random weights."""
    mc = dict(rec["model"])
    model = build_model(ModelConfig(**mc), dict(rec["meta"]))
    return _quantize_fresh(model, rec["quant"], rec["example_shape"])


def _quantize_fresh(model: nn.Module, quant: dict, example_shape) -> nn.Module:
    qcfg = QuantConfig(**{**quant, "ln_reparam": False})  # the fold is in the stored weights
    return convert_for_state(model, qcfg, torch.zeros(example_shape))


def convert_for_state(model: nn.Module, qcfg: QuantConfig, example: torch.Tensor) -> nn.Module:
    """``quantize_model`` for a model whose quantizer state is loaded next: the weight ranges
    start at min/max instead of the MSE search (on resnet18 ~20 s of CPU, every range then
    replaced by the stored one); the quantizers keep ``qcfg``'s range method for later
    ``set_bits``."""
    quantize_model(model, replace(qcfg, w_range="minmax", ln_reparam=False), example)
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.method = qcfg.w_range
    model.packptq_quant_cfg = qcfg
    return model


def _read(path) -> dict:
    """The checkpoint dict at ``path``, verified (format, digest, finite values); every fault is
    one ExportError line."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} not found (write one with packptq.save_quantized or packptq-export --format pt)")
    if path.is_dir():
        raise ExportError(f"{path} is a directory, not a packptq quantized file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as exc:  # truncated, text, half-written: torch's message is advice for pickles
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no detail"
        if "weights_only" in str(exc):  # torch's advice to load it unsafely is not ours to give
            first = "it holds objects other than tensors and plain data, or is no pickle at all"
        raise ExportError(f"{path} cannot be read as a packptq quantized file ({type(exc).__name__}: {first}); "
                          "it is damaged or of another kind: export it again") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ExportError(f"{path} is not a packptq quantized file (packptq.save_quantized / packptq-export --format pt)")
    if ck.get("version") not in (1, VERSION):
        raise ExportError(f"{path} has format version {ck.get('version')}; this packptq reads 1..{VERSION}: "
                          "upgrade packptq or export again")
    if ck["version"] >= 2 and ck.get("digest") != digest(ck):
        raise ExportError(f"{path} is damaged: its content does not match the digest written with it; "
                          "export it again")
    need = {"layers": dict, "state": dict, "attrs": dict}
    bad = [k for k, t in need.items() if not isinstance(ck.get(k), t)]
    if bad:
        raise ExportError(f"{path} lacks {bad} of a packptq quantized file; export it again")
    nonfinite = _nonfinite(ck["state"].items())
    if nonfinite is not None:
        raise ExportError(f"{path} holds non-finite values in {nonfinite}; export it again")
    return ck


def load_quantized(path, model: Optional[nn.Module] = None, map_location="cpu") -> nn.Module:
    """The quantized module saved by ``save_quantized`` (or ``packptq-export --format pt``), in
    eval mode; its logits equal those of the module that was saved.

    ``model``: a fresh instance of the saved module's FP architecture (the class the caller
    quantized; its weights do not matter, they are replaced), converted in place and returned.
    Without it the file's zoo recipe rebuilds the architecture (files from ``packptq-export``);
    a file from ``packptq.quantize`` on one's own class needs it. The file's digest and finite
    values are checked first; every fault is one ``ExportError`` line."""
    ck = _read(path)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ExportError(f"model is a {type(model).__name__}; pass a fresh instance of the architecture that "
                              "was quantized (an nn.Module)")
        if any(isinstance(m, QuantLayer) for m in model.modules()):
            raise ExportError("model is already quantized; pass a fresh FP instance of the architecture")
        quant = ck.get("quant") or (ck.get("recipe") or {}).get("quant")
        shape = ck.get("example_shape") or (ck.get("recipe") or {}).get("example_shape")
        try:
            model = _quantize_fresh(model, quant, shape)
        except Exception as exc:
            raise ExportError(f"{type(model).__name__} does not take the saved model's input shape {shape} "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); pass an instance of "
                              "the architecture that was quantized") from None
    elif ck.get("recipe"):
        model = rebuild(ck["recipe"])
    else:
        raise ExportError(f"{path} was saved from packptq.quantize on a model outside the zoo; load it with "
                          "packptq.load_quantized(path, model=YourNet(...)), a fresh instance of that class")
    for name, a in ck["attrs"].items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{path} does not match {type(model).__name__}: it has no module {name}; pass an "
                              "instance of the architecture that was quantized") from None
        for k, v in a.items():
            setattr(m, k, v)
    # every quantizer's tensors (scale shape [] or [C]) come from the state dict
    try:
        missing, unexpected = model.load_state_dict(ck["state"], strict=False)
    except RuntimeError as exc:  # shapes differ
        first = " ".join(str(exc).split())[:200]
        raise ExportError(f"{path} does not match {type(model).__name__} ({first}); pass an instance of the "
                          "architecture that was quantized") from None
    weights = {f"{n}.layer.weight" for n in ck["layers"]}
    if unexpected or set(missing) - weights:
        raise ExportError(f"{path} does not match {type(model).__name__}: missing "
                          f"{sorted(set(missing) - weights)[:5]}, unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, rec in ck["layers"].items():
            layer = model.get_submodule(name)
            if list(layer.layer.weight.shape) != list(rec["shape"]):
                raise ExportError(f"{path}: layer {name} has weight shape {rec['shape']}, the model's "
                                  f"{list(layer.layer.weight.shape)}; pass an instance of the architecture that "
                                  "was quantized")
            codes = unpack_codes(rec["codes"], rec["bits"], rec["shape"])
            layer.layer.weight.copy_(_dequant(codes, layer.wq))
            layer.wq.alpha, layer.wq.mode = None, "nearest"
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- onnx format
class _QDQ(torch.autograd.Function):
    """Uniform fake quantization of an activation; exported as QuantizeLinear ->
    DequantizeLinear (uint8) -> Clip to [lo, hi], the dequantized ends of 0..qmax (omitted
    when qmax = 255)."""

    @staticmethod
    def forward(ctx, x, scale, zp_u8, lo, hi, qmax: int):
        z = zp_u8.to(x.dtype)
        return (torch.clamp(torch.round(x / scale) + z, 0, qmax) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zp_u8, lo, hi, qmax: int):
        y = g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp_u8), scale, zp_u8)
        return y if qmax == 255 else g.op("Clip", y, lo, hi)


class _DQ(torch.autograd.Function):
    """Per-output-channel dequantization of integer weight codes (DequantizeLinear, axis 0)."""

    @staticmethod
    def forward(ctx, codes, scale, zp_u8):
        shape = [-1] + [1] * (codes.dim() - 1)
        return (codes.to(scale.dtype) - zp_u8.to(scale.dtype).view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zp_u8):
        return g.op("DequantizeLinear", codes, scale, zp_u8, axis_i=0)


#: buffers the ONNX mode adds to a quantizer while exporting (initialisers of the graph)
_ONNX_BUFFERS = ("_onnx_codes", "_onnx_scale", "_onnx_zp", "_onnx_lo", "_onnx_hi")


def _act_forward(self, x):
    return _QDQ.apply(x, self._onnx_scale, self._onnx_zp, self._onnx_lo, self._onnx_hi, self.qmax)


def _weight_forward(self, weight):
    return _DQ.apply(self._onnx_codes, self._onnx_scale, self._onnx_zp)


@contextmanager
def onnx_quantizers(model: nn.Module) -> Iterator[None]:
    """Within: every active quantizer of ``model`` computes through ``_QDQ`` / ``_DQ`` on
    constant integer codes, scales and zero points (same values, exported as QDQ). Refuses
    models with an active log-sqrt(2) quantizer."""
    for name, m in model.named_modules():
        if isinstance(m, LogSqrt2Quantizer) and m.enabled and bool(m.initialized):
            raise ExportError(f"{name}: the log-sqrt(2) softmax quantizer (quant.attn_prob=log2) has no exact form "
                              "in standard ONNX operators; export a run with quant.attn_prob=uniform, or use "
                              "--format pt")
    patched = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, UniformQuantizer) and m.enabled and bool(m.initialized):
                s = m.scale.detach().abs().clamp(min=1e-8).float()
                z = m.zero_point.detach().float()
                m.register_buffer("_onnx_scale", s.clone())
                m.register_buffer("_onnx_zp", z.to(torch.uint8))
                m.register_buffer("_onnx_lo", (0 - z) * s)
                m.register_buffer("_onnx_hi", (m.qmax - z) * s)
                m.forward = types.MethodType(_act_forward, m)
                patched.append(m)
            elif isinstance(m, QuantLayer) and m.wq.enabled:
                m.wq.register_buffer("_onnx_codes", weight_codes(m))
                m.wq.register_buffer("_onnx_scale", m.wq.scale.detach().float().clone())
                m.wq.register_buffer("_onnx_zp", m.wq.zero_point.detach().to(torch.uint8))
                m.wq.forward = types.MethodType(_weight_forward, m.wq)
                patched.append(m.wq)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
            for b in _ONNX_BUFFERS:
                m._buffers.pop(b, None)


def export_onnx(qmodel: nn.Module, path, example_input: torch.Tensor) -> Path:
    """Write ``qmodel`` as an ONNX graph with QuantizeLinear/DequantizeLinear nodes (opset 17,
    dynamic batch; input ``input``, output ``logits``), checked by ``onnx.checker``.
    ``example_input``: one batch the model takes (e.g. ``x[:1]``), fixing the other input
    dimensions. Written atomically: a failed export leaves no file behind."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the export extra
        raise ExportError("the onnx format needs `pip install packptq[export]` (onnx, onnxruntime)") from exc
    _check_quantized(qmodel)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or not len(example_input):
        raise ExportError(f"example_input must be a non-empty batch tensor the model takes (e.g. x[:1]), got "
                          f"{type(example_input).__name__}"
                          f"{' of shape ' + str(list(example_input.shape)) if isinstance(example_input, torch.Tensor) else ''}")
    qmodel = qmodel.eval()
    example = example_input.to(next(qmodel.parameters()).device)

    def write(tmp: Path) -> None:
        with onnx_quantizers(qmodel), torch.no_grad():
            try:
                torch.onnx.export(qmodel, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            except (OSError, ExportError):
                raise
            except Exception as exc:  # the exporter's own refusal (an operator, an input it cannot trace)
                raise ExportError(f"torch.onnx.export cannot export {type(qmodel).__name__} on an input of shape "
                                  f"{list(example.shape)}: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model, full_check=True)
        model.metadata_props.add(key=ONNX_DIGEST_KEY, value=onnx_digest(model))
        onnx.save(model, str(tmp))

    return _atomic_write(path, write)


#: the ONNX file's metadata key holding the sha256 of its graph
ONNX_DIGEST_KEY = "packptq_sha256"


def onnx_digest(model) -> str:
    """sha256 of an ONNX model's graph (nodes, initialisers, inputs, outputs) as serialised."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def check_onnx(path) -> None:
    """An ONNX file written by ``export_onnx``: readable and its graph equal to the digest stored
    with it; one ExportError line otherwise."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # a truncated or foreign file: protobuf's decode error
        raise ExportError(f"{path} cannot be read as an ONNX model ({type(exc).__name__}); export it again") from None
    stored = {p.key: p.value for p in model.metadata_props}.get(ONNX_DIGEST_KEY)
    if stored is not None and stored != onnx_digest(model):
        raise ExportError(f"{path} is damaged: its graph does not match the digest written with it; export it again")


def onnx_predict(path, x: torch.Tensor, batch_size: int = 256, optimization: str = "basic") -> torch.Tensor:
    """Logits of the ONNX model at ``path`` on ``x`` with onnxruntime (CPU).

    ``optimization``: onnxruntime's graph optimisation level (disable | basic | extended | all).
    ``basic`` (constant folding, redundant nodes) runs the QDQ graph as written; from
    ``extended`` on, onnxruntime fuses DequantizeLinear -> MatMul/Conv and LayerNorm/GELU
    patterns into kernels of its own whose float rounding differs, which on transformers
    moves some activations across a quantization step (experiments/results/export.md)."""
    import numpy as np
    import onnxruntime as ort

    check_onnx(path)
    levels = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[optimization])
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = [sess.run(None, {"input": x[i:i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out))


def write(fmt: str, qmodel: nn.Module, rec: dict, path) -> Path:
    """Export ``qmodel`` in ``fmt`` (pt | onnx) to ``path``."""
    if fmt == "pt":
        return save_quantized(qmodel, path, rec)
    if fmt == "onnx":
        return export_onnx(qmodel, path, torch.zeros(rec["example_shape"]))
    raise ExportError(f"export format '{fmt}'; use pt|onnx")


def default_path(run_dir, fmt: str, name: Optional[str] = None) -> Path:
    return Path(run_dir) / f"{name or 'quantized'}.{fmt}"


def export_quantized(qmodel: nn.Module, rec: dict, fmt: str, path, x_check: torch.Tensor) -> dict:
    """Write ``qmodel`` as ``fmt`` to ``path``, read it back (``load_quantized`` or onnxruntime)
    and compare its predictions with ``qmodel``'s on ``x_check``: {format, path, bytes,
    agreement (% equal top-1), max_abs_logit_diff, n}."""
    qmodel.eval()
    path = write(fmt, qmodel, rec, path)
    ref = forward_all(qmodel, x_check, 256).float()
    out = forward_all(load_quantized(path), x_check, 256).float() if fmt == "pt" else onnx_predict(path, x_check.cpu())
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item() * 100
    return {"format": fmt, "path": str(path), "bytes": path.stat().st_size, "agreement": agree,
            "max_abs_logit_diff": (out - ref).abs().max().item(), "n": len(x_check)}


# ----------------------------------------------------------------------------- a finished run
#: what a finished run's results.json must hold for packptq-export
RESULT_KEYS = ("config", "fingerprint", "units", "unit_keys", "mp")


def read_results(run_dir) -> dict:
    """RUN_DIR/results.json, checked: present, JSON, a finished run's keys; one ExportError line
    otherwise."""
    import json

    f = Path(run_dir) / "results.json"
    if not Path(run_dir).exists():
        raise ExportError(f"run directory {run_dir} not found")
    if not Path(run_dir).is_dir():
        raise ExportError(f"{run_dir} is not a directory (give a finished run directory, which has results.json)")
    if not f.is_file():
        raise ExportError(f"{f} not found (a finished run directory has results.json)")
    try:
        res = json.loads(f.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ExportError(f"{f} is not valid JSON{where}; rerun packptq on that run directory to rewrite it "
                          "(finished units are read back, not refitted)") from None
    missing = [k for k in RESULT_KEYS if not isinstance(res, dict) or k not in res]
    if missing or not isinstance(res.get("config"), dict):
        raise ExportError(f"{f} lacks {missing or ['config']} of a finished run; rerun packptq on that run "
                          "directory to rewrite it")
    return res


def from_units(run_dir, res: dict, n_check: int = 512):
    """The quantized model of a finished run rebuilt from its FP weights and its unit files
    (``unit_XX.pt``), without calibration: ``(qmodel, recipe, x_check, fp_file)`` with
    ``x_check`` up to ``n_check`` test inputs. None when the unit files do not hold the whole
    quantized state (no reconstruction, mixed precision, ``quant.ln_reparam``, quantizers
    outside every unit): the caller then rebuilds the run through its phases."""
    from omegaconf import OmegaConf

    from packptq import fp
    from packptq.config import typed
    from packptq.data import build_datamodule
    from packptq.recon.sequence import Chain, load_unit_state, unit_state
    from packptq.runtime import trainer_kwargs

    cfg = OmegaConf.create(res["config"])
    qcfg = typed(QuantConfig, cfg.quant, "quant")
    mcfg = typed(ModelConfig, cfg.model, "model")
    keys, names = res["unit_keys"], res["units"]
    if not keys or qcfg.ln_reparam or (res.get("mp") or {}).get("policy", "none") != "none":
        return None
    dm = build_datamodule(cfg.data)
    trainer_kw = trainer_kwargs(cfg.get("trainer"))
    model = fp.build(mcfg, dm)
    dm.setup()
    fp_file = fp.weights_file(mcfg, dm, cfg.cache_dir, trainer_kw)
    if fp.trains(mcfg) and not fp_file.is_file():
        raise ExportError(f"the FP weights this run started from are not in the cache ({fp_file}); run packptq "
                          f"with the run's config to train them again (cache_dir={cfg.cache_dir})")
    model = fp.obtain(model, dm, mcfg, cfg.cache_dir, trainer_kw).cpu()
    xs, n = [], 0
    for x, _ in dm.test_dataloader():
        xs.append(x)
        n += len(x)
        if n >= n_check:
            break
    x_check = torch.cat(xs)[:n_check]
    convert_for_state(model, qcfg, x_check[:2])
    needed = set(unit_state(model))
    covered = set()
    for i, (key, unit_names) in enumerate(zip(keys, names)):
        f = Path(run_dir) / f"unit_{i:02d}.pt"
        try:
            saved = torch.load(f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ExportError(f"{f} not found: the run directory lacks a finished unit; rerun packptq on it") from None
        except Exception as exc:
            raise ExportError(f"{f} is damaged ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}); "
                              "delete it and rerun packptq on the run directory to refit that unit") from None
        if not isinstance(saved, dict) or saved.get("key") != key or saved.get("names") != unit_names \
                or saved.get("fingerprint") != res["fingerprint"] or not isinstance(saved.get("state"), dict):
            raise ExportError(f"{f} is not unit {key} {unit_names} of this run; the run directory mixes two runs")
        if key.startswith("pack_"):
            parts = [model.get_submodule(b) for b in unit_names]
            module, prefixes = Chain(*parts), {str(j): b for j, b in enumerate(unit_names)}
        else:
            module, prefixes = model.get_submodule(unit_names[0]), None
        load_unit_state(module, saved["state"])
        for k in saved["state"]:
            head, _, rest = k.partition(".")
            covered.add(f"{prefixes[head]}.{rest}" if prefixes else f"{unit_names[0]}.{k}")
    if needed - covered:
        return None
    model.eval()
    rec = recipe(mcfg, dm.meta(), qcfg, x_check[:2].shape)
    return model, rec, x_check, fp_file
