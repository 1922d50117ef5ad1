"""packptq: Pack-PTQ and its baselines for post-training quantization of vision models.

Python verbs: ``packptq.quantize(model, calib_data, ...)`` (the phases of a run on one's own
module) and ``packptq.load_quantized(path)`` (a ``packptq-export --format pt`` file)."""

from packptq.version import __version__

__all__ = ["quantize", "load_quantized"]


def __getattr__(name):  # the verbs import torch and the phases only when used
    if name == "quantize":
        from packptq.api import quantize

        return quantize
    if name == "load_quantized":
        from packptq.export import load_quantized

        return load_quantized
    raise AttributeError(f"module 'packptq' has no attribute {name!r}")
