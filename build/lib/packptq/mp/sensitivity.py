"""Measured sensitivity of each pack to its bit-width, and the bit setter the allocation uses.

``kl_sensitivity`` runs the FP model with one pack at a time swapped for its quantized twin at
each candidate bit-width and averages the output KL (``packptq.evaluate.kl_per_sample``, the
same KL as the importance scores)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from packptq.evaluate import forward_all, kl_per_sample
from packptq.quant import ActQuantizer, QuantLayer, WeightQuantizer


def set_group_bits(modules: Sequence[nn.Module], w_bits: int, a_bits: Optional[int]) -> None:
    """Set every QuantLayer inside ``modules`` to ``w_bits`` (weight ranges re-initialised by the
    MSE search) and, unless ``a_bits`` is None, every activation quantizer inside them (the
    QuantLayers' and quantized attention's) to ``a_bits`` (re-initialised from the calibration
    samples they kept)."""
    layers = {id(m): m for top in modules for m in top.modules() if isinstance(m, QuantLayer)}
    for m in layers.values():
        m.set_bits(w_bits, a_bits)
    if a_bits is None:
        return
    own = {id(m.aq) for m in layers.values()}
    for top in modules:
        for m in top.modules():
            if isinstance(m, ActQuantizer) and id(m) not in own:
                m.set_bits(a_bits)


def snapshot(modules: Sequence[nn.Module]) -> List[Tuple[nn.Module, dict, list]]:
    """What ``set_group_bits`` changes in ``modules``: quantizer bits, modes, kept calibration
    samples and tensors. ``restore`` puts it back exactly (no second range search)."""
    out = []
    for top in modules:
        attrs = []
        for m in top.modules():
            if isinstance(m, WeightQuantizer):
                attrs.append((m, {"bits": m.bits, "mode": m.mode, "alpha": m.alpha}))
            elif isinstance(m, ActQuantizer):
                attrs.append((m.q, {"bits": m.q.bits}))
                attrs.append((m, {"_samples": list(m._samples)}))
        state = {k: v.detach().clone() for k, v in top.state_dict().items()}
        out.append((top, state, attrs))
    return out


def restore(snap) -> None:
    """Put back what ``snapshot`` recorded."""
    for top, state, attrs in snap:
        for m, values in attrs:
            for k, v in values.items():
                setattr(m, k, v)
        top.load_state_dict(state)


@torch.no_grad()
def kl_sensitivity(qsplit, fsplit, packs: Sequence[Sequence[int]], candidates: Sequence[int],
                   x: torch.Tensor, device: torch.device, act_bits_of=None, batch_size: int = 128,
                   progress: bool = False) -> np.ndarray:
    """Measured sensitivity [n_packs, n_candidates]: mean over ``x`` [n, ...] of
    KL(softmax(FP logits) || softmax(logits with only pack j at bits b)), in nats.

    Pack j runs from its cached FP input with its quantizers at b bits (weights re-initialised by
    the MSE search, activations at ``act_bits_of(b)`` re-initialised from their calibration
    samples; ``act_bits_of`` None or returning None leaves activations alone); every other part is
    the FP model. The pack's quantizers are restored afterwards."""
    q_blocks = [m for _, m in qsplit.blocks]
    f_blocks = [m for _, m in fsplit.blocks]
    fp_logits = forward_all(fsplit.forward, x, batch_size, device)
    h = forward_all(fsplit.prefix, x, batch_size, device)  # FP input of the current pack
    table = np.zeros((len(packs), len(candidates)), dtype=np.float64)
    bar = tqdm(list(enumerate(packs)), desc="sensitivity", disable=not progress, leave=False)
    for j, pack in bar:
        mods = [q_blocks[b] for b in pack]
        rest = f_blocks[pack[-1] + 1:]

        def run(z: torch.Tensor) -> torch.Tensor:
            for m in mods:
                z = m(z)
            for m in rest:
                z = m(z)
            return fsplit.suffix(z)

        snap = snapshot(mods)
        try:
            for k, b in enumerate(candidates):
                set_group_bits(mods, b, act_bits_of(b) if act_bits_of is not None else None)
                total = 0.0
                for i in range(0, len(h), batch_size):
                    q = run(h[i:i + batch_size].to(device))
                    total += float(kl_per_sample(fp_logits[i:i + batch_size].to(device), q).sum())
                table[j, k] = total / len(h)
        finally:
            restore(snap)
        for b in pack:
            h = forward_all(f_blocks[b], h, batch_size, device)
    return table
