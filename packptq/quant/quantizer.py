"""Fake quantizers: asymmetric uniform (per tensor / per channel, MSE range search, learnable
step size), AdaRound weight rounding, and the log-sqrt(2) quantizer for softmax outputs."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from packptq.quant import kernels


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def _view(t: torch.Tensor, x: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    if ch_axis is None:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.view(shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization on the grid {(k - zp) * scale : k = 0..qmax}."""
    q = torch.clamp(round_ste(x / scale) + zp, 0, qmax)
    return (q - zp) * scale


#: the error norm of the MSE range search: |q - x|^2.4, the official Pack-PTQ code's. It weighs
#: large (clipping) errors more than a squared error does; at 3-bit weights this keeps more of
#: the range (docs/decisions.md)
RANGE_NORM = 2.4


@torch.no_grad()
def search_range(x: torch.Tensor, bits: int, ch_axis: Optional[int] = None, method: str = "mse",
                 grid: int = 80, p: float = RANGE_NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose (scale, zero_point) for ``x``: per channel along ``ch_axis`` or per tensor.

    ``minmax`` uses the full range; ``mse`` shrinks [min, max] by ratios in (0, 1] and keeps, per
    channel, the one with the least Lp reconstruction error. Returns tensors of shape [C] (or [])."""
    qmax = 2 ** bits - 1
    x = x.detach().float()
    if ch_axis is not None:
        xc = x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)
    else:
        xc = x.reshape(1, -1)
    lo = xc.min(dim=1).values.clamp(max=0.0)
    hi = xc.max(dim=1).values.clamp(min=0.0)

    def params(r: float):
        s = ((hi - lo) * r / qmax).clamp(min=1e-8)
        z = torch.round(-lo * r / s).clamp(0, qmax)
        return s, z

    if method == "minmax":
        best_s, best_z = params(1.0)
    elif method == "mse":
        best_err = torch.full_like(lo, float("inf"))
        best_s, best_z = params(1.0)
        for i in range(grid):
            r = 1.0 - i / grid  # 1.0 down to 1/grid
            s, z = params(r)
            q = (torch.clamp(torch.round(xc / s[:, None]) + z[:, None], 0, qmax) - z[:, None]) * s[:, None]
            err = (q - xc).abs().pow(p).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    else:
        raise ValueError(f"unknown range method '{method}'; known: minmax, mse")
    if ch_axis is None:
        return best_s[0], best_z[0]
    return best_s, best_z


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake quantizer with bit-width ``bits`` (2..8).

    Per channel along ``ch_axis`` or per tensor (``ch_axis=None``). Until ``init_from`` runs it
    passes inputs through. With ``learn_scale`` the step size is a Parameter trained through the
    straight-through estimator (LSQ-style); the zero point stays fixed."""

    def __init__(self, bits: int, ch_axis: Optional[int] = None, learn_scale: bool = False) -> None:
        super().__init__()
        self.bits = int(bits)
        self.ch_axis = ch_axis
        self.learn_scale = learn_scale
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learn_scale)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.enabled = True

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def init_from(self, x: torch.Tensor, method: str = "mse") -> None:
        s, z = search_range(x, self.bits, self.ch_axis, method)
        self.scale = nn.Parameter(s.to(self.scale.device), requires_grad=self.learn_scale)
        self.zero_point = z.to(self.zero_point.device)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not bool(self.initialized):
            return x
        s = _view(self.scale.abs().clamp(min=1e-8), x, self.ch_axis)
        z = _view(self.zero_point, x, self.ch_axis)
        return fake_quant(x, s, z, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ch_axis={self.ch_axis}, learn_scale={self.learn_scale}"


class LogSqrt2Quantizer(nn.Module):
    """Quantizer for softmax probabilities in [0, 1] on the grid {0} U {2^(-k/2)} (RepQ-ViT's
    log-sqrt(2)): finer resolution near 0 where most attention mass lies. The scale (the
    largest level) is fitted by MSE on calibration data."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.enabled = True
        self.learn_scale = False

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def _q(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # clamp at 0: values above the scale saturate at it (2**bits levels, as in RepQ-ViT)
        levels = torch.round(-2 * torch.log2((x / scale).clamp(min=1e-20))).clamp(min=0)
        q = scale * torch.pow(2.0, -levels / 2)
        return torch.where(levels >= self.qmax, torch.zeros_like(x), q)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str = "mse") -> None:
        x = x.detach().float().reshape(-1)
        m = x.max().clamp(min=1e-8)
        best, best_s = float("inf"), m
        for r in torch.linspace(0.5, 1.0, 11):
            err = (self._q(x, m * r) - x).pow(2).mean().item()
            if err < best:
                best, best_s = err, m * r
        self.scale.copy_(best_s)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not bool(self.initialized):
            return x
        q = self._q(x, self.scale)
        return (q - x).detach() + x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log-sqrt2"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with calibration (observe) and QDrop modes.

    ``observing``: pass through, keep a random subsample of the values seen (for the MSE range
    search) and the elements per sample (for bit accounting). ``drop_prob`` > 0 (training only):
    each element keeps its FP value with that probability (QDrop)."""

    def __init__(self, bits: int, kind: str = "uniform", sample_cap: int = 1 << 18) -> None:
        super().__init__()
        self.q = LogSqrt2Quantizer(bits) if kind == "log2" else UniformQuantizer(bits, None, learn_scale=True)
        self.kind = kind
        self.observing = False
        self.drop_prob = 0.0
        self.sample_cap = sample_cap
        self._samples: list[torch.Tensor] = []
        self.register_buffer("elems_per_sample", torch.zeros((), dtype=torch.long))

    @property
    def bits(self) -> int:
        return self.q.bits

    def set_bits(self, bits: int) -> None:
        if bits != self.q.bits:
            self.q.bits = int(bits)
            if bool(self.q.initialized):
                self.init_from(self._samples_cat() if self._samples else None)

    def _samples_cat(self) -> torch.Tensor:
        return torch.cat(self._samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            flat = x.detach().reshape(-1)
            per = max(1, self.sample_cap // 8)
            if flat.numel() > per:
                flat = flat[torch.randint(flat.numel(), (per,), device=flat.device)]
            self._samples.append(flat.float().cpu())
            self.elems_per_sample.fill_(x[0].numel() if x.dim() > 0 else 1)
            return x
        xq = self.q(x)
        if self.drop_prob > 0 and self.training:
            keep_fp = torch.rand_like(x) < self.drop_prob
            return torch.where(keep_fp, x, xq)
        return xq

    def finish_observing(self, method: str = "mse") -> None:
        self.observing = False
        if self._samples:
            self.init_from(self._samples_cat(), method)

    def init_from(self, x: Optional[torch.Tensor], method: str = "mse") -> None:
        if x is None:
            return
        if x.numel() > self.sample_cap:
            x = x[torch.randperm(x.numel())[: self.sample_cap]]
        self._samples = [x]
        self.q.init_from(x, method)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


#: AdaRound's stretch of the sigmoid: h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
ZETA, GAMMA = 1.1, -0.1


class SoftRound(torch.autograd.Function):
    """AdaRound's soft-rounded weight and, when ``beta`` is given, its rounding regulariser
    sum(1 - |2h(V) - 1|^beta), as one autograd node over a whole weight tensor: the one
    implementation of soft rounding (``WeightQuantizer`` in soft mode and the reconstruction
    step both call it).

    floor(w / s) is constant over a fit and comes in precomputed (``base``). On the CPU the
    forward and the backward are one loop over the weights each (``packptq.quant.kernels``;
    equal to the tensor operations below to float rounding). Otherwise h(V) serves both the
    weight and the regulariser; |2h - 1|^beta is computed once and its derivative factor kept for
    the backward, which recomputes the sigmoid and the two clamp masks instead of holding them
    (memory over time: three weight-sized tensors fewer per step). The weight and its gradient
    are bit-identical to autograd's without the regulariser; with it, equal to float rounding.
    ``s`` and ``z`` are the per-channel scale and zero point viewed to broadcast."""

    @staticmethod
    def _h(sig, inplace: bool = False):
        """(u, h): sigmoid(V) stretched to (gamma, zeta) and its clamp to [0, 1]; with
        ``inplace`` both overwrite ``sig`` (u is then h), else each is a fresh tensor."""
        u = (sig.mul_ if inplace else sig.mul)(ZETA - GAMMA).add_(GAMMA)
        return u, (u.clamp_(0, 1) if inplace else u.clamp(0, 1))

    @staticmethod
    def forward(ctx, alpha, base, s, z, qmax: int, beta: Optional[float]):
        ctx.beta, ctx.qmax = beta, qmax
        ctx.fused = kernels.applicable(alpha, base, s, z)
        if ctx.fused:  # one pass over the weights (packptq.quant.kernels)
            w, reg, (sg, r) = kernels.softround_forward(alpha, base, s, z, qmax, beta)
            ctx.save_for_backward(sg, base, s, z, r)
            return w, reg
        h = SoftRound._h(torch.sigmoid(alpha), inplace=True)[1]
        w = (base + h).add_(z).clamp_(0, qmax).sub_(z).mul_(s)
        # saved: the inputs (alive anyway) and, with the regulariser, its gradient factor; the
        # sigmoid and the two clamp masks are recomputed in backward, and the forward works in
        # place: on the 11M-weight pack of resnet18 the step's peak memory fell by ~0.2 GB
        if beta is None:
            ctx.save_for_backward(alpha, base, s, z)
            return w, w.new_zeros(())
        d = h.mul_(2).sub_(1)
        # |d|^beta as exp(beta log|d|): half the time of pow with a float exponent on CPU,
        # equal to float rounding (|d| = 0 gives exp(-inf) = 0 as it should for beta > 0)
        p = d.abs().log_().mul_(beta).exp_() if beta > 0 else d.abs().pow_(beta)
        reg = (1 - p).sum()
        # d/dh (1 - |d|^beta) = -2 beta |d|^(beta - 1) sgn(d) = -2 beta p / d, 0 where d = 0
        # (p / d is 0 / 0 there); kept instead of d and p: one tensor less held for backward
        r = p.div_(d).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        ctx.save_for_backward(alpha, base, s, z, r)
        return w, reg

    @staticmethod
    def backward(ctx, g_w, g_reg):
        if ctx.fused:
            sg, base, s, z, r = ctx.saved_tensors
            return kernels.softround_backward((sg, r), base, s, z, ctx.qmax, ctx.beta, g_w, g_reg), \
                None, None, None, None, None
        alpha, base, s, z = ctx.saved_tensors[:4]
        # autograd's operations in autograd's order (bit-identical without the regulariser)
        sig = torch.sigmoid(alpha)
        u, h = SoftRound._h(sig)
        out_u = h != u  # where the clamp to [0, 1] passes no gradient
        del u
        t = (base + h).add_(z)
        del h
        out_t = (t < 0).logical_or_(t > ctx.qmax)  # where the clamp to the grid passes none
        del t
        g = (g_w * s).masked_fill_(out_t, 0.0)
        if ctx.beta is not None:
            g.addcmul_(ctx.saved_tensors[4], g_reg * (-2.0 * ctx.beta))
        g.masked_fill_(out_u, 0.0).mul_(ZETA - GAMMA)
        return torch.ops.aten.sigmoid_backward(g, sig), None, None, None, None, None


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer with AdaRound.

    Modes: ``nearest`` (round to nearest), ``soft`` (AdaRound training: floor + h(V)),
    ``hard`` (floor + 1[V >= 0], the frozen result). h is the rectified sigmoid of AdaRound."""

    zeta, gamma = ZETA, GAMMA

    def __init__(self, weight: torch.Tensor, bits: int, method: str = "mse") -> None:
        super().__init__()
        self.bits = int(bits)
        self.method = method
        self.mode = "nearest"
        self.enabled = True
        s, z = search_range(weight, bits, 0, method)
        self.register_buffer("scale", s)
        self.register_buffer("zero_point", z)
        self.alpha: Optional[nn.Parameter] = None

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def set_bits(self, bits: int, weight: torch.Tensor) -> None:
        self.bits = int(bits)
        s, z = search_range(weight, self.bits, 0, self.method)
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.alpha = None
        self.mode = "nearest"

    def _sz(self, w: torch.Tensor):
        return _view(self.scale, w, 0), _view(self.zero_point, w, 0)

    def init_adaround(self, weight: torch.Tensor) -> None:
        """Create rounding variables V so that soft rounding starts at the FP weight."""
        s, _ = self._sz(weight)
        frac = weight.detach() / s - torch.floor(weight.detach() / s)
        frac = frac.clamp(0.01, 0.99)  # keep V finite
        v = -torch.log((self.zeta - self.gamma) / (frac - self.gamma) - 1)
        self.alpha = nn.Parameter(v)
        self.mode = "soft"

    def h(self) -> torch.Tensor:
        return SoftRound._h(torch.sigmoid(self.alpha))[1]

    def round_reg(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser sum(1 - |2h - 1|^beta): pushes h to 0 or 1 (the grid does not
        enter it, so ``SoftRound`` runs on a zero base with unit scale)."""
        one, zero = self.alpha.new_ones(()), self.alpha.new_zeros(())
        return SoftRound.apply(self.alpha, torch.zeros_like(self.alpha), one, zero, self.qmax, beta)[1]

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized integers k in 0..qmax (hard rounding if AdaRound ran)."""
        s, z = self._sz(weight)
        if self.alpha is not None and self.mode in ("soft", "hard"):
            base = torch.floor(weight / s) + (self.alpha >= 0).float()
        else:
            base = torch.round(weight / s)
        return torch.clamp(base + z, 0, self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        s, z = self._sz(weight)
        if self.mode == "soft" and self.alpha is not None:
            return SoftRound.apply(self.alpha, torch.floor(weight / s), s, z, self.qmax, None)[0]
        if self.mode == "hard" and self.alpha is not None:
            return (self.integer_weight(weight) - z) * s
        return fake_quant(weight, s, z, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, per_channel"

