"""The Python verbs: ``quantize(model, calib_data, ...)`` runs the phases of a packptq run
(calibrate, score, pack, bits, recon) on one's own ``nn.Module``; ``load_quantized(path)``
reads a ``pt`` export back (``packptq.export``)."""
from __future__ import annotations

import copy
import tempfile
import warnings
from typing import Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from packptq import calibration, fp
from packptq.config import CONF_DIR
from packptq.context import RunContext
from packptq.evaluate import first_last, forward_all
from packptq.export import load_quantized  # noqa: F401  (re-exported)
from packptq.inputs import calib_inputs
from packptq.pipeline import quantize_phases
from packptq.runtime import quiet_lightning
from packptq.settings import Settings
from packptq.zoo.build import ModelConfig



def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml composed with Hydra-style ``overrides`` (e.g. ``["quant=w2a4",
    "recon.iters=500", "packing=block"]``)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from packptq.schemas import register

    register()
    with warnings.catch_warnings():
        # the user config directory on the search path is optional: Hydra warns on every compose
        # while it does not exist
        warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.* is not available")
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
    s = Settings.of(cfg, model=False)
    ctx = RunContext.create(run_dir or tempfile.mkdtemp(prefix="packptq-quantize-"), cfg.get("trainer"), seed,
                            batch_size, progress=progress)
    model = copy.deepcopy(model).eval().to(ctx.device)
    fp_preds = predict_tensor(model, x, batch_size)
    split = fp.split(model, ModelConfig(name=type(model).__name__, family=family), x[:2].to(ctx.device))
    if s.mp is not None:
        s.mp.check_feasible(model, split)
    twins = calibration.run(ctx, s.quant, model, split.family, x)
    ptq = quantize_phases(ctx, s, twins, x, fp_preds if y is None else y)
    names = twins.block_names
    report = {
        "blocks": names, "family": split.family,
        "packs": [[names[i] for i in p] for p in ptq.packs], "bits": ptq.bits.pack_bits,
        **ptq.bits.acct,
        "recon_loss": first_last(ptq.recon.losses),
        "calib_agreement": (predict_tensor(twins.qmodel, x, batch_size) == fp_preds).float().mean().item() * 100,
        "time_s": ctx.timer.times, "run_dir": str(ctx.rd.path),
        "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("quant", "packing", "mp", "recon")},
    }
    return twins.qmodel.eval(), report


def predict_tensor(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Top-1 predictions [n] of ``model`` on the tensor ``x`` [n, ...] (model in eval mode)."""
    return forward_all(model.eval(), x, batch_size).argmax(-1)
