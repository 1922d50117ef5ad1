"""FP pre-training (Lightning) for models without a checkpoint on embedded data, cached under a
key made from the model and data config, and top-1 evaluation with torchmetrics."""
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
from torchmetrics.classification import MulticlassAccuracy


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
    kw = dict(accelerator="auto", devices=1, enable_checkpointing=False, enable_model_summary=False,
              logger=logger if logger is not None else False, num_sanity_val_steps=0, limit_val_batches=0)
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


@torch.no_grad()
def predict(model: nn.Module, loader, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes [n], labels [n]) over a loader."""
    model.eval()
    device = device or next(model.parameters()).device
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(preds), torch.cat(labels)


def top1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Micro top-1 accuracy in percent."""
    m = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return float(m(preds, labels)) * 100.0
