"""Quantized layers: Conv1d/Conv2d/Linear with a weight quantizer and an activation quantizer
placed on the layer input (Pack-PTQ, RepQ-ViT) or output (BRECQ, QDrop), and a quantized
timm attention whose two matmuls see quantized operands."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from packptq.quant.quantizer import ActQuantizer, WeightQuantizer


class QuantLayer(nn.Module):
    """Wraps a Conv1d/Conv2d/Linear (BN already folded). The original module is kept as
    ``self.layer`` (its weight is frozen FP data); ``wq`` quantizes the weight, ``aq`` the
    input or output activation depending on ``placement``."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int, placement: str = "input",
                 w_method: str = "mse") -> None:
        super().__init__()
        if placement not in ("input", "output"):
            raise ValueError(f"act placement must be 'input' or 'output', got {placement}")
        self.layer = layer
        self.placement = placement
        self.wq = WeightQuantizer(layer.weight.detach(), w_bits, w_method)
        self.aq = ActQuantizer(a_bits)
        self.act_enabled = True  # False for the network-input layer (input placement)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def qweight(self) -> torch.Tensor:
        return self.wq(self.layer.weight)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "input" and self.act_enabled:
            x = self.aq(x)
        y = self._op(x, self.qweight())
        if self.placement == "output" and self.act_enabled:
            y = self.aq(y)
        return y

    def set_bits(self, w_bits: Optional[int] = None, a_bits: Optional[int] = None) -> None:
        if w_bits is not None and w_bits != self.wq.bits:
            self.wq.set_bits(w_bits, self.layer.weight.detach())
        if a_bits is not None:
            self.aq.set_bits(a_bits)

    def extra_repr(self) -> str:
        return f"placement={self.placement}, act={'on' if self.act_enabled else 'off'}"


class QAttention(nn.Module):
    """Multi-head self-attention of timm's ViT/DeiT with quantized matmul operands:
    q and k before ``q @ k^T``, the softmax probabilities and v before ``attn @ v``.
    ``qkv`` and ``proj`` are QuantLayers (converted with the rest of the model). With every
    quantizer disabled the output equals timm's forward."""

    def __init__(self, attn: nn.Module, a_bits: int, attn_prob: str = "uniform") -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv = attn.qkv
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self.q_quant = ActQuantizer(a_bits)
        self.k_quant = ActQuantizer(a_bits)
        self.v_quant = ActQuantizer(a_bits)
        self.p_quant = ActQuantizer(a_bits, kind=attn_prob)

    def act_quantizers(self):
        return [self.q_quant, self.k_quant, self.v_quant, self.p_quant]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        B, N, _C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = self.q_quant(q * self.scale)
        k = self.k_quant(k)
        attn = q @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = self.attn_drop(self.p_quant(attn.softmax(dim=-1)))
        x = attn @ self.v_quant(v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
