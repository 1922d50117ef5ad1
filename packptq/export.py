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

``onnx``: QuantizeLinear/DequantizeLinear (opset 17). Weights are uint8 initialisers of their
integer codes followed by a per-axis DequantizeLinear; every activation quantizer becomes a
QuantizeLinear -> DequantizeLinear pair in uint8, followed for b < 8 by a Clip to the
dequantized ends of 0..2^b-1, which is the same as clamping the integers. The log-sqrt(2)
softmax quantizer has no exact standard-operator form and is refused (``ExportError``)."""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from packptq.config import ConfigError
from packptq.evaluate import forward_all
from packptq.quant import QuantConfig, quantize_model
from packptq.quant.modules import QuantLayer
from packptq.quant.quantizer import ActQuantizer, LogSqrt2Quantizer, UniformQuantizer, WeightQuantizer
from packptq.zoo.build import ModelConfig, build_model, resolved_config

FORMAT = "packptq-quantized"
VERSION = 1
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


def quantized_state(qmodel: nn.Module, rec: dict) -> dict:
    """The pt checkpoint of ``qmodel`` (a dict, see the module docstring)."""
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
    return {"format": FORMAT, "version": VERSION, "recipe": rec, "layers": layers, "state": state, "attrs": attrs}


def save_quantized(qmodel: nn.Module, rec: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(quantized_state(qmodel, rec), tmp)
    tmp.replace(path)
    return path


def rebuild(rec: dict) -> nn.Module:
    """The quantized architecture of a recipe, with uninitialised quantizers and random weights."""
    mc = dict(rec["model"])
    model = build_model(ModelConfig(**mc), dict(rec["meta"]))
    qcfg = QuantConfig(**rec["quant"])
    qcfg = QuantConfig(**{**asdict(qcfg), "ln_reparam": False})  # folded into the stored weights
    quantize_model(model, qcfg, torch.zeros(rec["example_shape"]))
    return model


def load_quantized(path, map_location="cpu") -> nn.Module:
    """The quantized module saved by ``save_quantized`` (``packptq-export --format pt``), in eval
    mode: its predictions equal those of the run's quantized model."""
    ck = torch.load(path, map_location=map_location, weights_only=True)  # tensors and plain data only
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ExportError(f"{path} is not a packptq quantized checkpoint (packptq-export --format pt)")
    model = rebuild(ck["recipe"])
    for name, a in ck["attrs"].items():
        m = model.get_submodule(name)
        for k, v in a.items():
            setattr(m, k, v)
    # every quantizer's tensors (scale shape [] or [C]) come from the state dict
    missing, unexpected = model.load_state_dict(ck["state"], strict=False)
    weights = {f"{n}.layer.weight" for n in ck["layers"]}
    if unexpected or set(missing) - weights:
        raise ExportError(f"{path} does not match the rebuilt architecture: missing "
                          f"{sorted(set(missing) - weights)[:5]}, unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, rec in ck["layers"].items():
            layer = model.get_submodule(name)
            codes = unpack_codes(rec["codes"], rec["bits"], rec["shape"])
            layer.layer.weight.copy_(_dequant(codes, layer.wq))
            layer.wq.alpha, layer.wq.mode = None, "nearest"
    return model.eval()


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


def export_onnx(qmodel: nn.Module, example: torch.Tensor, path) -> Path:
    """Write ``qmodel`` as ONNX with QDQ nodes (dynamic batch), checked by ``onnx.checker``."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the export extra
        raise ExportError("the onnx format needs `pip install packptq[export]` (onnx, onnxruntime)") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qmodel = qmodel.eval()
    with onnx_quantizers(qmodel), torch.no_grad():
        torch.onnx.export(qmodel, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_predict(path, x: torch.Tensor, batch_size: int = 256, optimization: str = "basic") -> torch.Tensor:
    """Logits of the ONNX model at ``path`` on ``x`` with onnxruntime (CPU).

    ``optimization``: onnxruntime's graph optimisation level (disable | basic | extended | all).
    ``basic`` (constant folding, redundant nodes) runs the QDQ graph as written; from
    ``extended`` on, onnxruntime fuses DequantizeLinear -> MatMul/Conv and LayerNorm/GELU
    patterns into kernels of its own whose float rounding differs, which on transformers
    moves some activations across a quantization step (experiments/results/export.md)."""
    import numpy as np
    import onnxruntime as ort

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
        return save_quantized(qmodel, rec, path)
    if fmt == "onnx":
        device = next(qmodel.parameters()).device
        return export_onnx(qmodel, torch.zeros(rec["example_shape"], device=device), path)
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
