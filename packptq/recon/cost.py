"""Predicted wall time of reconstruction, from a probe run when it starts.

A reconstruction step of a unit costs about a forward and backward pass of the FP unit on one
batch (the quantized step adds fake quantization and QDrop's mixing on top of it: a factor),
plus work proportional to the unit's rounding variables (AdaRound's soft rounding, its
regulariser and Adam: per weight, and per weight tensor), plus a fixed per-step cost (the
training loop, drawing a batch from the cache). The probe measures on the run's device, under
the trainer's precision:

- each unit's FP forward+backward on its real input, captured by one forward of a calibration
  batch of ``recon.batch_size`` through the FP model with hooks;
- one reconstruction step (``UnitReconstruction.step_loss``, backward, Adam) of a single
  quantized Linear at two sizes: the slope is the cost per rounding variable, the intercept
  the cost per weight tensor.

The two factors and the fixed costs were fitted (relative least squares) on the steps of 29
units of four CNNs and a ViT measured by ``experiments/cost_table.py`` on one CPU thread;
``experiments/results/cost.md`` holds the data and the prediction error. Units whose FP compute
is small beside their activations (depthwise convolutions) cost more than predicted: fake
quantization scales with activation elements, not MACs."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from packptq.quant import QuantLayer
from packptq.recon.unit import ReconConfig, UnitReconstruction
from packptq.runtime import autocast
from packptq.twins import Twins

#: quantized step / FP forward+backward of the unit, rounding variables apart (fitted)
FP_FACTOR = 1.2
#: real rounding work / the probe's (the probe's lone Linear also pays its weight gradient, and
#: its per-tensor intercept holds a step's fixed work; fitted)
WEIGHT_FACTOR = 1.0
#: seconds per step that depend on no unit size: the loop and Lightning's hooks (fitted)
STEP_OVERHEAD_S = 6e-4
#: seconds per unit outside the steps: building the Trainer, set-up and freezing (fitted)
FIT_OVERHEAD_S = 0.06


@dataclass
class UnitCost:
    """The predicted cost of one unit: ``steps`` x ``step_s`` + ``FIT_OVERHEAD_S`` seconds."""

    key: str
    steps: int
    n_weights: int  # rounding variables (weights of the unit's enabled weight quantizers)
    n_tensors: int  # weight tensors they belong to
    fp_s: float  # measured FP forward+backward of the unit on one batch
    step_s: float  # predicted seconds per step
    seconds: float  # predicted seconds of the unit's fit
    per_weight_s: float = 0.0  # the probe's seconds per rounding variable and step
    per_tensor_s: float = 0.0  # the probe's seconds per weight tensor and step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: the probe's clock: wall time (a benchmark on a shared machine may set the process's CPU time)
CLOCK: Callable[[], float] = time.perf_counter


def _best_time(fn: Callable[[], None], device: torch.device, reps: int = 2) -> float:
    """Fastest of ``reps`` timed calls of ``fn`` after one untimed call (allocations, kernel
    selection), in seconds."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        _sync(device)
        best = min(best, CLOCK() - t0)
    return best


def unit_weights(module: nn.Module) -> tuple:
    """(rounding variables, weight tensors) a unit trains: the weights of its QuantLayers whose
    weight quantizer is enabled."""
    ws = [m.layer.weight for m in module.modules() if isinstance(m, QuantLayer) and m.wq.enabled]
    return sum(w.numel() for w in ws), len(ws)


def fp_fwd_bwd_time(module: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Seconds of one forward and backward of the FP ``module`` on ``x`` with gradients for its
    parameters (what the rounding variables' gradients cost in the quantized step); the
    parameters' ``requires_grad`` and ``grad`` are left as they were."""
    params = list(module.parameters())
    state = [(p.requires_grad, p.grad) for p in params]

    def step() -> None:
        out = module(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().pow(2).mean().backward()

    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            return _best_time(step, device)
    finally:
        for p, (rg, g) in zip(params, state):
            p.requires_grad_(rg)
            p.grad = g


def rounding_cost(cfg: ReconConfig, device: torch.device, sizes: Sequence[int] = (256, 1024)) -> tuple:
    """(seconds per rounding variable, seconds per weight tensor) of a reconstruction step:
    one step of a quantized Linear(n, n) for each n in ``sizes`` on a batch of one sample
    (a regularised step: after the warm-up, as most steps are); the slope and intercept of the
    step time against n * n."""
    times = []
    for n in sizes:
        ql = QuantLayer(nn.Linear(n, n, bias=False), 4, 8, w_method="minmax").to(device)
        module = UnitReconstruction(ql, cfg, "probe")
        module.on_train_start()
        opt = module.configure_optimizers()["optimizer"]
        x = torch.randn(1, n, device=device)
        batch = (x, x, torch.zeros(1, n, device=device))
        late = max(1, cfg.iters) - 1

        def step() -> None:
            _, loss = module.step_loss(batch, late)
            opt.zero_grad()
            loss.backward()
            opt.step()

        with torch.enable_grad():
            times.append(_best_time(step, device, reps=3))
    n0, n1 = sizes[0] ** 2, sizes[-1] ** 2
    per_weight = max((times[-1] - times[0]) / (n1 - n0), 0.0)
    per_tensor = max(times[0] - per_weight * n0, 0.0)
    return per_weight, per_tensor


def unit_inputs(fp: Callable[[torch.Tensor], torch.Tensor], modules: Dict[str, nn.Module],
                x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The input of each of ``modules`` ({key: module ``fp`` runs}) while ``fp`` runs on ``x``."""
    seen: Dict[str, torch.Tensor] = {}
    hooks = []
    for key, m in modules.items():
        def hook(_m, args, key=key):
            seen.setdefault(key, args[0].detach().clone())  # clone: in-place ops later
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            fp(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def predict_costs(twins: Twins, units: List, steps: List[int], x: torch.Tensor, cfg: ReconConfig,
                  trainer_kwargs: Optional[dict] = None) -> Dict[str, UnitCost]:
    """{unit key: UnitCost} for ``units`` (``recon.sequence.Unit``; ``steps[i]`` optimisation
    steps for ``units[i]``) from a probe on ``twins.device`` under the trainer's precision;
    ``x`` [n, ...] calibration inputs (the first ``cfg.batch_size`` are used)."""
    device = twins.device
    fblocks = [b for _, b in twins.fsplit.blocks]
    fp_mods: Dict[str, nn.Module] = {}
    q_mods: Dict[str, nn.Module] = {}
    for u in units:
        if u.layer is not None:
            q_mods[u.key], fp_mods[u.key] = twins.pair(u.layer)
        else:
            q_mods[u.key] = nn.ModuleList([twins.qsplit.blocks[b][1] for b in u.blocks])
            fp_mods[u.key] = nn.Sequential(*[fblocks[b] for b in u.blocks])
    first = {k: (m[0] if isinstance(m, nn.Sequential) else m) for k, m in fp_mods.items()}
    was_training = twins.fp.training
    twins.fp.eval()
    # the probe draws random numbers (a Linear's initialisation, QDrop's mixing): on a forked
    # generator, so that a run's results do not depend on recon.predict
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), autocast(trainer_kwargs or {}, device):
        # through the split: a block that is a part of the graph (GraphBlock) runs only there
        inputs = unit_inputs(twins.fsplit.forward, first, x[:cfg.batch_size].to(device))
        per_weight, per_tensor = rounding_cost(cfg, device) if cfg.adaround else (0.0, 0.0)
        out = {}
        for u, n_steps in zip(units, steps):
            n_w, n_t = unit_weights(q_mods[u.key]) if cfg.adaround else (0, 0)
            fp_s = fp_fwd_bwd_time(fp_mods[u.key], inputs[u.key], device) if u.key in inputs else 0.0
            step_s = FP_FACTOR * fp_s + WEIGHT_FACTOR * (per_weight * n_w + per_tensor * n_t) + STEP_OVERHEAD_S
            secs = step_s * n_steps + FIT_OVERHEAD_S if n_steps else 0.0
            out[u.key] = UnitCost(u.key, n_steps, n_w, n_t, fp_s, step_s, secs, per_weight, per_tensor)
    twins.fp.train(was_training)
    return out


def describe(costs: Dict[str, UnitCost], probe_s: float) -> str:
    """The lines a run logs: the predicted total, then one line per unit."""
    total = sum(c.seconds for c in costs.values())
    lines = [f"recon: predicted {total:.0f} s for {len(costs)} unit(s) ({_hms(total)}; probe {probe_s:.1f} s)"]
    for c in costs.values():
        lines.append(f"  {c.key}: {c.seconds:.1f} s = {c.steps} steps x {c.step_s * 1e3:.1f} ms "
                     f"({c.n_weights} rounding variables, FP fwd+bwd {c.fp_s * 1e3:.1f} ms)")
    return "\n".join(lines)


def _hms(s: float) -> str:
    h, rest = divmod(int(round(s)), 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s"


def as_record(c: Optional[UnitCost]) -> dict:
    """The prediction's keys in ``unit_XX.json`` (none without a prediction)."""
    if c is None:
        return {}
    d = asdict(c)
    return {"predicted_seconds": round(d["seconds"], 3), "predicted_step_s": d["step_s"], "probe_fp_s": d["fp_s"],
            "n_weights": d["n_weights"]}
