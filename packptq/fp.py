"""The FP model phase: build the network (zoo builder, checkpoint or timm weights), split it into
prefix / blocks / suffix, and train it with Lightning when it comes without weights (cached
under a key made from the model and data config, so every PTQ seed starts from one network)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from packptq.artifacts import file_digest
from packptq.runtime import TRAINER_DEFAULTS
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
        self.log("fp/train_loss", loss, prog_bar=True)
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


def fp_cache_key(model_cfg, data_cfg) -> str:
    """The FP model depends on the model and data config (split seed included), not on the
    run seed: every PTQ seed starts from the same trained network."""
    desc = {"model": asdict(model_cfg), "data": asdict(data_cfg), "v": 3}  # v2: BN trains; v3: no decay on norms/biases
    for k in ("checkpoint", "pretrained"):
        desc["model"].pop(k, None)
    desc["data"].pop("calib_size", None)
    desc["data"].pop("calib_seed", None)  # calibration choice does not change the FP model
    desc["data"].pop("num_workers", None)
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{model_cfg.name}-{data_cfg.name}-{h}"


def train_or_load(model: nn.Module, dm, model_cfg, data_cfg, cache_dir: Path,
                  trainer_kwargs: Optional[dict] = None, logger=None) -> Tuple[nn.Module, str]:
    """Return the trained FP model and where its weights live (cached .pt)."""
    path = Path(cache_dir) / "fp" / f"{fp_cache_key(model_cfg, data_cfg)}.pt"
    seed = data_cfg.seed
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), str(path)
        except Exception as exc:  # a corrupt cache entry is retrained, never trusted
            print(f"[packptq] FP cache {path} unreadable ({str(exc).splitlines()[0]}); retraining")
    L.seed_everything(seed, workers=True, verbose=False)
    dm.setup()
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=model_cfg.train_batch_size, shuffle=True,
                                         generator=g, num_workers=dm.cfg.num_workers, drop_last=True)
    module = Classifier(model, model_cfg.train_lr, model_cfg.train_wd, model_cfg.train_epochs, len(loader))
    kw = dict(TRAINER_DEFAULTS, logger=logger if logger is not None else False)
    kw.update(trainer_kwargs or {})
    kw.update(max_epochs=model_cfg.train_epochs)
    model.train()  # build_model returns eval mode; Lightning keeps modes, and BN must train
    L.Trainer(**kw).fit(module, train_dataloaders=loader)
    model.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, str(path)


def trains(model_cfg: ModelConfig) -> bool:
    """Whether the FP weights come from training here (no checkpoint, no pretrained weights)."""
    return not (model_cfg.checkpoint or model_cfg.pretrained)


def identity(model_cfg: ModelConfig, data_cfg) -> Optional[str]:
    """What identifies the FP weights for the resume guard: the training cache key (which
    carries the training code's version), a checkpoint file's content digest, or None for
    library weights (named by the config itself)."""
    if trains(model_cfg):
        return fp_cache_key(model_cfg, data_cfg)
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


def weights_file(model_cfg: ModelConfig, data_cfg, cache_dir) -> Optional[Path]:
    """The file holding the FP weights: the training cache entry or the checkpoint (None for
    library weights)."""
    if model_cfg.checkpoint:
        return Path(model_cfg.checkpoint)
    if trains(model_cfg):
        return Path(cache_dir) / "fp" / f"{fp_cache_key(model_cfg, data_cfg)}.pt"
    return None


def obtain(model: nn.Module, dm, model_cfg: ModelConfig, cache_dir: Path, trainer_kwargs: dict) -> nn.Module:
    """The FP weights: trained (or read from the cache) when the model needs training, else the
    model as built (checkpoint or library weights already loaded)."""
    if trains(model_cfg):
        model, _ = train_or_load(model, dm, model_cfg, dm.cfg, Path(cache_dir), trainer_kwargs)
    return model.eval()
