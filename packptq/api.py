"""The Python verbs: ``quantize(model, calib_data, ...)`` runs the phases of a packptq run
(calibrate, score, pack, bits, recon) on one's own ``nn.Module``; ``load_quantized(path)``
reads a ``pt`` export back (``packptq.export``)."""
from __future__ import annotations

import copy
import tempfile
from typing import Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from packptq import fp, mp
from packptq.artifacts import RunDir
from packptq.config import CONF_DIR, typed
from packptq.evaluate import predict
from packptq.export import load_quantized  # noqa: F401  (re-exported)
from packptq.inputs import calib_inputs
from packptq.packing import PackingConfig
from packptq.pipeline import quantize_phases
from packptq.quant import QuantConfig
from packptq.recon import ReconConfig
from packptq.runtime import Timer, device_of, quiet_lightning, trainer_kwargs
from packptq.zoo.build import ModelConfig



def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml composed with Hydra-style ``overrides`` (e.g. ``["quant=w2a4",
    "recon.iters=500", "packing=block"]``)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from packptq.schemas import register

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its own instance
        return hydra_compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def quantize(model: nn.Module, calib_data,
             overrides: Sequence[str] = (), cfg: Optional[DictConfig] = None, family: str = "auto",
             run_dir: Optional[str] = None, seed: int = 0, batch_size: int = 64,
             progress: bool = False) -> Tuple[nn.Module, dict]:
    """Quantize ``model`` (left unchanged) with the phases of the command line and return
    ``(quantized_module, report)``.

    ``calib_data``: inputs ``x`` [n, ...], ``(x, y)``, a ``Dataset`` or a ``DataLoader`` (items
    or batches ``x`` or ``(x, y)``), checked first (``packptq.inputs``: one-line ``DataError``s);
    without labels the model's own predictions stand in (they only enter the Hessian scores). Settings: ``cfg`` (a composed
    config with the sections quant, packing, mp, recon, trainer) or Hydra-style ``overrides``
    of conf/config.yaml. Blocks are found by the split rule ``family`` ("auto": the named family
    rules, then the dataflow-graph rule, then the module-tree one; docs/splitting.md). Artefacts (units, packs, scores) go to ``run_dir`` (default:
    a temporary directory). The report holds the packs (block names), weight bits per pack,
    the bit accounting, the reconstruction losses, agreement of the quantized and FP top-1 on
    the calibration inputs, and the seconds per phase."""
    x, y = calib_inputs(model, calib_data)  # every input fault is one line, before any work
    quiet_lightning()
    cfg = compose(overrides) if cfg is None else cfg
    qcfg = typed(QuantConfig, cfg.quant, "quant")
    rcfg = typed(ReconConfig, cfg.recon, "recon")
    pcfg = typed(PackingConfig, cfg.packing, "packing")
    mp_plan = mp.plan(cfg.mp, qcfg)
    trainer_kw = trainer_kwargs(cfg.get("trainer"))
    device = device_of(trainer_kw)
    model = copy.deepcopy(model).eval().to(device)
    fp_preds = predict_tensor(model, x, batch_size)
    y = fp_preds if y is None else y
    split = fp.split(model, ModelConfig(name=type(model).__name__, family=family), x[:2].to(device))
    if mp_plan is not None:
        mp_plan.check_feasible(model, split)
    rd = RunDir(run_dir or tempfile.mkdtemp(prefix="packptq-quantize-"))
    timer = Timer()
    twins, info = quantize_phases(model, split, x, y, qcfg, pcfg, rcfg, mp_plan, rd, seed, batch_size,
                                  trainer_kw, device, timer, None, progress)
    names = twins.block_names
    qpreds = predict_tensor(twins.qmodel, x, batch_size)
    report = {
        "blocks": names, "family": split.family,
        "packs": [[names[i] for i in p] for p in info["packs"]], "bits": info["pack_bits"],
        **info["acct"],
        "recon_loss": {k: [v[0], v[-1]] for k, v in info["unit_losses"].items() if v},
        "calib_agreement": (qpreds == fp_preds).float().mean().item() * 100,
        "time_s": timer.times, "run_dir": str(rd.path),
        "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("quant", "packing", "mp", "recon")},
    }
    return twins.qmodel.eval(), report


@torch.no_grad()
def predict_tensor(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Top-1 predictions of ``model`` on the tensor ``x``."""
    loader = [(x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long))
              for i in range(0, len(x), batch_size)]
    return predict(model, loader, next(model.parameters()).device)[0]
