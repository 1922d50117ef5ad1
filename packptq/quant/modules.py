"""Quantized layers: Conv1d/Conv2d/Linear with a weight quantizer and an activation quantizer
placed on the layer input (Pack-PTQ, RepQ-ViT) or output (BRECQ, QDrop), and quantized
versions of timm's attention modules (ViT/DeiT ``Attention``, Swin ``WindowAttention``) whose
two matmuls see quantized operands. Converters from the timm classes are registered in
``packptq.quant.convert.ATTENTION_CONVERTERS``."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from packptq.quant.quantizer import ActQuantizer, WeightQuantizer


class QuantLayer(nn.Module):
    """Wraps a Conv1d/Conv2d/Linear (BN already folded). The original module is kept as
    ``self.layer`` (its weight is frozen FP data); ``wq`` quantizes the weight, ``aq`` the
    input or output activation depending on ``placement``."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int, placement: str = "input",
                 w_method: str = "mse", range_grid: str = "full") -> None:
        super().__init__()
        if placement not in ("input", "output"):
            raise ValueError(f"act placement must be 'input' or 'output', got {placement}")
        self.layer = layer
        self.placement = placement
        self.wq = WeightQuantizer(layer.weight.detach(), w_bits, w_method, range_grid)
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


class _QuantMatmuls(nn.Module):
    """The quantized core shared by the attention modules: ``q @ k^T`` and ``attn @ v`` with
    every operand quantized (q after the 1/sqrt(d) scaling, k, v, and the post-softmax
    probabilities with a uniform or log-sqrt(2) quantizer). Activation quantizers start
    uncalibrated (pass-through), so before ``calibrate`` the module computes in FP."""

    def _init_quantizers(self, a_bits: int, attn_prob: str) -> None:
        if attn_prob not in ("uniform", "log2"):
            raise ValueError(f"attn_prob must be 'uniform' or 'log2', got {attn_prob}")
        self.attn_prob = attn_prob
        self.q_quant = ActQuantizer(a_bits)
        self.k_quant = ActQuantizer(a_bits)
        self.v_quant = ActQuantizer(a_bits)
        self.p_quant = ActQuantizer(a_bits, kind=attn_prob)

    def act_quantizers(self) -> List[ActQuantizer]:
        return [self.q_quant, self.k_quant, self.v_quant, self.p_quant]

    def set_bits(self, a_bits: int) -> None:
        for m in self.act_quantizers():
            m.set_bits(a_bits)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """q, k, v: [B, heads, N, head_dim] -> [B, heads, N, head_dim]. ``bias`` adds position
        bias and masks to the logits [B, heads, N, N] before the softmax."""
        q = self.q_quant(q * self.scale)
        attn = q @ self.k_quant(k).transpose(-2, -1)
        if bias is not None:
            attn = bias(attn)
        attn = self.attn_drop(self.p_quant(attn.softmax(dim=-1)))
        return attn @ self.v_quant(v)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, attn_prob={self.attn_prob}"


class QAttention(_QuantMatmuls):
    """Multi-head self-attention of timm's ViT/DeiT (``timm.models.vision_transformer.Attention``)
    with quantized matmul operands. ``qkv``, ``proj`` (and ``gate``) are the original Linear
    modules, converted to QuantLayers with the rest of the model. With every quantizer disabled
    the output equals timm's forward (its explicit-softmax path; the fused SDPA path agrees to
    float rounding)."""

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
        self._init_quantizers(a_bits, attn_prob)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """x: [B, N, C] -> [B, N, dim_out]; ``attn_mask``: additive or boolean (True = attend)."""
        B, N, _C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = _self_attn_bias(N, q, attn_mask, is_causal)
        x = self._attend(q, k, v, None if mask is None else (lambda a: a + mask))
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _self_attn_bias(n: int, ref: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool) -> Optional[torch.Tensor]:
    """Additive logit bias with SDPA semantics (as timm's ``resolve_self_attn_mask``)."""
    if is_causal:
        return ref.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=ref.dtype).masked_fill_(~attn_mask, float("-inf"))


class QWindowAttention(_QuantMatmuls):
    """Swin's window attention (``timm.models.swin_transformer.WindowAttention``) with quantized
    matmul operands. The relative position bias (table and index shared with the original
    module) and the shifted-window mask are added to the logits in FP before the softmax, as
    timm does. With every quantizer disabled the output equals timm's forward."""

    def __init__(self, attn: nn.Module, a_bits: int, attn_prob: str = "uniform") -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_size = attn.window_size
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self._init_quantizers(a_bits, attn_prob)

    def _rel_pos_bias(self) -> torch.Tensor:
        """[1, heads, window_area, window_area]."""
        a = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(a, a, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [num_windows * B, N, C]; ``mask``: (0/-inf) [num_windows, N, N] or None."""
        B_, N, _C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rel = self._rel_pos_bias()

        def bias(attn: torch.Tensor) -> torch.Tensor:
            attn = attn + rel
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(-1, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            return attn

        x = self._attend(q, k, v, bias)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
