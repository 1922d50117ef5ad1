"""Model-evaluation helpers shared by the pipeline, the importance scores and mixed precision:
batched forward passes and the per-sample output KL. Nothing here imports other packptq modules."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def forward_all(fn: Callable, x: torch.Tensor, bs: int, device: torch.device) -> torch.Tensor:
    """fn over x [n, ...] in batches on ``device``; the result [n, ...] on the CPU."""
    return torch.cat([fn(x[i:i + bs].to(device)).cpu() for i in range(0, len(x), bs)])


def kl_per_sample(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(p) || softmax(q)) over the last dimension: [..., C] -> [...]."""
    lp = F.log_softmax(p_logits, -1)
    return (lp.exp() * (lp - F.log_softmax(q_logits, -1))).sum(-1)
