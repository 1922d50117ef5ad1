"""PointNet classifier (Qi et al., 2017) without the T-Nets, and its split rule.

Input: a batch of point clouds ``[B, N, in_dim]`` (point-major, as the point datasets yield
them); output: logits ``[B, num_classes]``. A shared per-point MLP (Conv1d k=1 + BN + ReLU
per layer) lifts every point to ``width`` features, a symmetric max over points makes the
result independent of point order, and an MLP head classifies the global feature."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from packptq.config import ConfigError
from packptq.zoo.build import BUILDERS, ModelConfig
from packptq.zoo.split import SPLIT_RULES, Fn, Split, _seq


class PointLayer(nn.Module):
    """One shared per-point layer: Conv1d(k=1) + BN + ReLU on ``[B, C, N]``; with ``pool`` the
    symmetric max over the N points follows (output ``[B, C_out]``)."""

    def __init__(self, cin: int, cout: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm1d(cout)
        self.act = nn.ReLU()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return x.amax(dim=-1) if self.pool else x


class FCLayer(nn.Module):
    """Linear + BN + ReLU (+ dropout) on ``[B, C]``."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.bn(self.fc(x))))


class PointNet(nn.Module):
    """``encoder``: per-point layers in_dim -> 64 -> 64 -> 64 -> 128 -> width, the last one
    max-pooled over points; ``head``: FC width -> 512 -> 256 (dropout before the classifier);
    ``fc``: 256 -> num_classes."""

    def __init__(self, num_classes: int, in_dim: int = 3, width: int = 1024,
                 point_widths: Sequence[int] = (64, 64, 64, 128), head_widths: Sequence[int] = (512, 256),
                 dropout: float = 0.3) -> None:
        super().__init__()
        dims = [in_dim, *point_widths, width]
        self.encoder = nn.Sequential(*[PointLayer(a, b, pool=(i == len(dims) - 2))
                                       for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        hd = [width, *head_widths]
        self.head = nn.Sequential(*[FCLayer(a, b, dropout if i == len(hd) - 2 else 0.0)
                                    for i, (a, b) in enumerate(zip(hd[:-1], hd[1:]))])
        self.fc = nn.Linear(hd[-1], num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, in_dim] -> logits [B, num_classes]."""
        return self.fc(self.head(self.encoder(x.transpose(1, 2))))


_KWARGS = ("width", "point_widths", "head_widths", "dropout")


@BUILDERS.register("pointnet")
def build_pointnet(cfg: ModelConfig, meta: dict) -> nn.Module:
    """PointNet for ``meta['num_classes']`` classes and ``meta['in_chans']`` coordinates per point
    (3 if absent); ``cfg.kwargs`` may set width, point_widths, head_widths, dropout."""
    if cfg.pretrained:
        raise ConfigError("model.pretrained=true: there are no pretrained PointNet weights; set "
                          "model.pretrained=false (packptq trains it) or give model.checkpoint")
    bad = sorted(set(cfg.kwargs) - set(_KWARGS))
    if bad:
        raise ConfigError(f"model.kwargs {bad} are not PointNet arguments; known: {list(_KWARGS)}")
    kw = dict(cfg.kwargs)
    for k in ("point_widths", "head_widths"):
        if k in kw:
            kw[k] = tuple(int(v) for v in kw[k])
    return PointNet(num_classes=meta["num_classes"], in_dim=meta.get("in_chans") or 3, **kw)


@SPLIT_RULES.register("pointnet")
def _pointnet(model: nn.Module) -> Split | None:
    """Prefix: transpose to [B, C, N] and the first per-point layer (the stem, like a CNN's
    first conv); blocks: the other per-point layers (``encoder.{i}``, the last one ends with
    the max-pool) and the head's FC layers (``head.{j}``); suffix: the classifier ``fc``."""
    if not isinstance(model, PointNet):
        return None
    enc = [f"encoder.{i}" for i in range(len(model.encoder))]
    stem = _seq(enc[:1])
    blocks = [(n, model.get_submodule(n)) for n in enc[1:]]
    blocks += [(f"head.{j}", b) for j, b in enumerate(model.head)]
    return Split(Fn(model, lambda m, x: stem(m, x.transpose(1, 2)), enc[:1]), blocks, Fn(model, _seq(["fc"]), ["fc"]))
