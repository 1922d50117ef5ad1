"""packptq: Pack-PTQ and its baselines for post-training quantization of vision models."""

__version__ = "0.1.0"
