"""Quantizers, quantized modules and model conversion."""
from packptq.quant.convert import (ATTENTION_CONVERTERS, QuantConfig, act_quantizers, calibrate, fold_bn,
                                   freeze, quant_layers, quantize_model, register_attention, set_quant_state,
                                   weight_quantizers)
from packptq.quant.modules import QAttention, QuantLayer, QWindowAttention
from packptq.quant.quantizer import (ActQuantizer, LogSqrt2Quantizer, UniformQuantizer,
                                     WeightQuantizer, search_range)

__all__ = [
    "QuantConfig", "act_quantizers", "calibrate", "fold_bn", "freeze", "quant_layers", "quantize_model",
    "set_quant_state", "weight_quantizers", "QAttention", "QuantLayer", "QWindowAttention",
    "ATTENTION_CONVERTERS", "register_attention", "ActQuantizer",
    "LogSqrt2Quantizer", "UniformQuantizer", "WeightQuantizer", "search_range",
]
