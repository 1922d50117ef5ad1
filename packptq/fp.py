"""The FP model phase: build the network (zoo builder, checkpoint or timm weights), split it into
prefix / blocks / suffix, and train it with Lightning when it comes without weights (cached
under a key made from the model and data config, so every PTQ seed starts from one network)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from tqdm.auto import tqdm

from packptq.artifacts import file_digest, save_pt
from packptq.config import ConfigError, RunFailure
from packptq.context import RunContext, log
from packptq.evaluate import EvalSet, predict, top1
from packptq.recon.sequence import check_cache_budget
from packptq.runtime import TRAINER_DEFAULTS, device_of, one_thread, step_bar
from packptq.zoo import check_split, split_model
from packptq.zoo.build import ModelConfig, build_model
from packptq.zoo.split import Split


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, wd: float, epochs: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.model, self.lr, self.wd = model, lr, wd
        self.total = max(1, epochs * steps_per_epoch)

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y, label_smoothing=0.1)
        self.log("fp/train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        # no weight decay on norm scales and biases: decayed, the zero-initialised last BN of each
        # residual branch stays near 0 and the network degenerates to its shortcut path (one 1x1
        # conv per stage), which no 4-bit quantizer survives (docs/decisions.md)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() > 1]
        rest = [p for p in self.model.parameters() if p.requires_grad and p.dim() <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.wd}, {"params": rest, "weight_decay": 0.0}],
                                lr=self.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.total, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


#: data settings that do not change the trained FP weights (serving and calibration choices;
#: the data's content enters the key through its digest, so a moved file keeps its model)
_DATA_NOT_IN_KEY = ("calib_size", "calib_seed", "calib_transform", "num_workers", "batch_size", "path")


def fp_cache_key(model_cfg, data_cfg, content: Optional[str] = None, precision: Optional[str] = None) -> str:
    """The FP model depends on the model config, the data config that shapes the training split
    (split seed included), the training samples' content digest ``content`` and the training
    precision; not on the run seed (every PTQ seed starts from the same trained network), the
    evaluation batch size, the calibration choice or the data's location."""
    desc = {"model": asdict(model_cfg), "data": asdict(data_cfg), "v": 4}  # v2: BN trains; v3: no decay on norms/biases; v4: one CPU thread
    for k in ("checkpoint", "pretrained", "strict"):
        desc["model"].pop(k, None)
    for k in _DATA_NOT_IN_KEY:
        desc["data"].pop(k, None)
    desc["content"] = content
    if precision not in (None, "32-true", "32", 32):
        desc["precision"] = str(precision)
    for k in ("val_size", "img_size"):  # unset: the key of configs that predate the field
        if not desc["data"].get(k):
            desc["data"].pop(k, None)
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{model_cfg.name}-{data_cfg.name}-{h}"


def cache_path(model_cfg, dm, cache_dir: Path, trainer_kwargs: Optional[dict] = None) -> Path:
    """Where the FP model trained for ``dm``'s data lives in the cache."""
    key = fp_cache_key(model_cfg, dm.cfg, dm.content_digest(), (trainer_kwargs or {}).get("precision"))
    return Path(cache_dir) / "fp" / f"{key}.pt"


def check_trainable(model_cfg, dm) -> int:
    """Optimiser steps one epoch of FP training takes (batches of ``train_batch_size`` over the
    training split less the validation rows, last partial batch dropped: what ``_train`` sees);
    a configuration that would train zero steps is a ConfigError."""
    n = len(training_indices(dm))
    steps = n // model_cfg.train_batch_size
    if steps < 1:
        held = f" after data.val_size={dm.cfg.val_size} validation rows are held out" if dm.cfg.val_size else ""
        raise ConfigError(f"FP training would take no optimiser step: the training split has {n} samples{held}, "
                          f"fewer than model.train_batch_size={model_cfg.train_batch_size}; lower "
                          "model.train_batch_size" + (" or data.val_size" if held else "") + " or give more training data")
    return steps


def training_indices(dm) -> list:
    """Indices of the training split that FP training uses: every row outside the validation
    split (the network must not see the rows that choose hyper-parameters)."""
    dm.setup()
    held = set(dm.val_indices().tolist()) if dm.cfg.val_size else set()
    return [i for i in range(len(dm.train_set)) if i not in held]


def check_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written there, else a ConfigError (before any
    training, so no trained model is lost to an unwritable cache)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"FP cache folder {folder} is not writable ({exc.strerror or exc}); set cache_dir=... "
                          "or PACKPTQ_CACHE to a writable folder") from None


@contextmanager
def _locked(lock_path: Path):
    """An exclusive advisory lock on ``lock_path`` (jobs of a sweep that need the same FP model
    wait for the one training it)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_cached(model: nn.Module, path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in sd.values()):
            raise ValueError("non-finite values")
        model.load_state_dict(sd)
        return True
    except Exception as exc:  # a corrupt cache entry is retrained, never trusted
        log.warning("FP cache %s unreadable (%s); retraining", path, str(exc).splitlines()[0])
        return False


def train_or_load(model: nn.Module, dm, model_cfg, data_cfg, cache_dir: Path,
                  trainer_kwargs: Optional[dict] = None, logger=None,
                  progress: bool = False) -> Tuple[nn.Module, str]:
    """Return the trained FP model and where its weights live (cached .pt). Concurrent callers
    for one cache entry train it once: the first holds a lock while the others wait, then load.
    With ``progress``, one bar over every training step of every epoch (ETA for the whole
    training)."""
    dm.setup()
    path = cache_path(model_cfg, dm, cache_dir, trainer_kwargs)
    if _load_cached(model, path):
        return model.eval(), str(path)
    steps = check_trainable(model_cfg, dm)
    check_writable(path.parent)
    with _locked(path.with_suffix(".lock")):
        if _load_cached(model, path):  # trained by another job while this one waited
            return model.eval(), str(path)
        _train(model, dm, model_cfg, data_cfg.seed, steps, trainer_kwargs, logger, progress)
        save_pt(path, model.state_dict())
    return model, str(path)


def _train(model: nn.Module, dm, model_cfg, seed: int, steps: int, trainer_kwargs: Optional[dict], logger,
           progress: bool = False) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
    g = torch.Generator().manual_seed(seed)
    train_set = dm.train_set
    if dm.cfg.val_size:  # the validation split must be unseen by the network to choose anything
        train_set = torch.utils.data.Subset(train_set, training_indices(dm))
    loader = torch.utils.data.DataLoader(train_set, batch_size=model_cfg.train_batch_size, shuffle=True,
                                         generator=g, num_workers=dm.cfg.num_workers, drop_last=True)
    module = Classifier(model, model_cfg.train_lr, model_cfg.train_wd, model_cfg.train_epochs, len(loader))
    kw = dict(TRAINER_DEFAULTS, logger=logger if logger is not None else False,
              log_every_n_steps=max(1, min(50, len(loader) // 4)))  # a curve even for short epochs
    kw.update(trainer_kwargs or {})
    kw.update(max_epochs=model_cfg.train_epochs)
    log.info("training the FP model: %d epochs of %d steps", model_cfg.train_epochs, steps)
    bar = tqdm(total=model_cfg.train_epochs * len(loader), desc=f"FP training, {model_cfg.train_epochs} epochs",
               unit="step", dynamic_ncols=True) if progress else None
    if bar is not None:
        kw["callbacks"] = [*kw.get("callbacks", []), step_bar(bar)]
    model.train()  # build_model returns eval mode; Lightning keeps modes, and BN must train
    trainer = L.Trainer(**kw)
    with one_thread(device_of(kw)):  # the same weights at any thread count (runtime.one_thread)
        trainer.fit(module, train_dataloaders=loader)
    if trainer.global_step < 1:  # never cache an untrained network under a trained model's key
        raise RunFailure("FP training took no optimiser step; nothing was cached. Check model.train_batch_size "
                         "against the training split")
    if bar is not None:
        bar.close()
    model.cpu().eval()
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"FP training diverged: non-finite weights in {bad[:3]}; lower model.train_lr")


def check_not_chance(fp_top1: float, num_classes: int, trained_here: bool, where: str) -> None:
    """An FP model near chance accuracy (top-1 below 1.5x chance) is not worth quantizing: an
    error for a model trained here (its cache entry ``where`` is named), a warning for given
    weights (a checkpoint may be meant for other data)."""
    chance = 100.0 / max(1, num_classes)
    if fp_top1 >= 1.5 * chance or num_classes < 2:
        return
    msg = (f"the FP model's top-1 is {fp_top1:.2f}%, near chance ({chance:.2f}% for {num_classes} classes)")
    if trained_here:
        raise ConfigError(f"{msg}: FP training failed (model.train_epochs, model.train_lr, the data?); "
                          f"delete {where} to retrain")
    log.warning("%s: check model.checkpoint and the data", msg)


def trains(model_cfg: ModelConfig) -> bool:
    """Whether the FP weights come from training here (no checkpoint, no pretrained weights)."""
    return not (model_cfg.checkpoint or model_cfg.pretrained)


def identity(model_cfg: ModelConfig, dm, trainer_kwargs: Optional[dict] = None) -> Optional[str]:
    """What identifies the FP weights for the resume guard: the training cache key (which
    carries the training code's version and the data's content), a checkpoint file's content
    digest, or None for library weights (named by the config itself)."""
    if trains(model_cfg):
        return cache_path(model_cfg, dm, Path("."), trainer_kwargs).stem
    return file_digest(model_cfg.checkpoint) if model_cfg.checkpoint else None


def build(model_cfg: ModelConfig, dm) -> nn.Module:
    """The FP network for ``dm``'s data, initialised from the data seed (one FP model serves
    every run seed); the datamodule's transforms follow it."""
    torch.manual_seed(dm.cfg.seed)
    model = build_model(model_cfg, dm.meta())
    dm.attach_model(model)
    return model


def split(model: nn.Module, model_cfg: ModelConfig, example: torch.Tensor) -> Split:
    """``model`` split into prefix / blocks / suffix, checked to reproduce the model on
    ``example`` [2, ...]."""
    s = split_model(model, model_cfg.family, example_input=example)
    check_split(model, s, example, atol=1e-4)
    return s


def weights_file(model_cfg: ModelConfig, dm, cache_dir, trainer_kwargs: Optional[dict] = None) -> Optional[Path]:
    """The file holding the FP weights: the training cache entry or the checkpoint (None for
    library weights)."""
    if model_cfg.checkpoint:
        return Path(model_cfg.checkpoint)
    if trains(model_cfg):
        return cache_path(model_cfg, dm, cache_dir, trainer_kwargs)
    return None


def obtain(model: nn.Module, dm, model_cfg: ModelConfig, cache_dir: Path, trainer_kwargs: dict,
           logger=None, progress: bool = False) -> nn.Module:
    """The FP weights: trained (or read from the cache) when the model needs training, else the
    model as built (checkpoint or library weights already loaded). ``logger`` (a Lightning
    logger) receives the training curve."""
    if trains(model_cfg):
        model, _ = train_or_load(model, dm, model_cfg, dm.cfg, Path(cache_dir), trainer_kwargs, logger,
                                 progress)
    return model.eval()


@dataclass
class FPResult:
    """What the fp phase hands on: the FP ``model`` (on the run's device) and its ``split``
    (consumed by calibration), the calibration inputs ``x_cal`` [n, ...] and labels ``y_cal``
    [n] (training split), the evaluation data, the FP top-1 on the test (and validation)
    split in percent, the FP predictions on the test set [n_test], and whether the run
    directory resumes a run."""

    model: Optional[nn.Module]
    split: Optional[Split]
    x_cal: torch.Tensor
    y_cal: torch.Tensor
    data: EvalSet
    top1: float
    val_top1: Optional[float]
    preds: torch.Tensor
    resumed: bool = False

    def take(self) -> Tuple[nn.Module, str]:
        """(the FP model, its split rule's family) for calibration, which consumes the model:
        this result lets go of it and of its split."""
        model, family = self.model, self.split.family
        self.model = self.split = None
        return model, family


def run(ctx: RunContext, settings, dm, cache_dir) -> FPResult:
    """The fp phase: build and split the model, refuse what cannot run (an infeasible bit
    budget, a cache budget no unit fits, a run directory of another run, a training that
    would take no step, an unwritable cache) before any training, obtain the FP weights,
    measure them (``fp.json``) and stop on a model trained here that is near chance.
    ``settings``: the run's ``settings.Settings``."""
    mcfg, plan = settings.model, settings.mp
    with ctx.phase("fp", precision=False):
        model = build(mcfg, dm)
        dm.setup()
        x_cal, y_cal = dm.calib_tensors()  # reads every calibration sample: a corrupt one stops here
        data = EvalSet(dm, dm.val_dataloader() if dm.cfg.val_size else None)  # choices are made on val, never test
        fsplit = split(model, mcfg, x_cal[:2])
        if plan is not None:  # an impossible bit budget stops here, before FP training
            plan.check_feasible(model, fsplit)
        check_cache_budget(settings.recon, settings.packing.entry.units, fsplit, x_cal,
                           shutil.disk_usage(ctx.rd.path).free)
        resumed = ctx.open(identity(mcfg, dm, ctx.trainer_kw), dm.fingerprint())
        fp_file = cache_path(mcfg, dm, cache_dir, ctx.trainer_kw) if trains(mcfg) else None
        if fp_file is not None and not fp_file.is_file():
            check_trainable(mcfg, dm)  # before any training: zero steps, an unwritable cache
            check_writable(fp_file.parent)
        model = obtain(model, dm, mcfg, cache_dir, ctx.trainer_kw, ctx.logger, ctx.progress).to(ctx.device)
        res = ctx.rd.cached_json("fp.json", lambda: _measure(ctx, model, data))
        check_not_chance(res["fp_top1"], data.num_classes, trains(mcfg), fp_file)
        ctx.log_metrics({"eval/fp_top1": res["fp_top1"]})
    log.info("%s on %s: FP top-1 %.2f%%  (%srun dir %s)", mcfg.name, dm.cfg.name, res["fp_top1"],
             "resuming " if resumed else "", ctx.rd.path)
    return FPResult(model, fsplit, x_cal, y_cal, data, res["fp_top1"], res.get("fp_val_top1"),
                    torch.tensor(res["preds"]), resumed)


def _measure(ctx: RunContext, model: nn.Module, data: EvalSet) -> dict:
    """``fp.json``: the FP top-1 on the test and validation splits and the test predictions."""
    with ctx.autocast():
        preds, labels = predict(model, data.test(), ctx.device)
        val = None if data.val is None else top1(*predict(model, data.val, ctx.device), data.num_classes)
    return {"fp_top1": top1(preds, labels, data.num_classes), "fp_val_top1": val, "preds": preds.tolist()}
