"""packptq: Pack-PTQ and its baselines for post-training quantization of vision models.

Python verbs: ``packptq.quantize(model, calib_data, ...)`` (the phases of a run on one's own
module), ``packptq.save_quantized(qmodel, path)`` / ``packptq.load_quantized(path, model=...)``
(the quantized module as integer codes, scales and quantizer state) and
``packptq.export_onnx(qmodel, path, example_input)`` (a QDQ graph). Their input faults are
``packptq.DataError`` / ``packptq.ExportError`` (both ``packptq.ConfigError``)."""

from packptq.version import __version__

__all__ = ["quantize", "save_quantized", "load_quantized", "export_onnx", "ConfigError", "DataError",
           "ExportError"]

#: public name -> module that defines it (imported on first use: the verbs pull in torch)
_LAZY = {"quantize": "packptq.api", "save_quantized": "packptq.export", "load_quantized": "packptq.export",
         "export_onnx": "packptq.export", "ExportError": "packptq.export", "DataError": "packptq.inputs",
         "ConfigError": "packptq.config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packptq' has no attribute {name!r}")
