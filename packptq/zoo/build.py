"""Model builders: timm models by name (adapted to the datamodule's input), our PointNet,
and checkpoint loading."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from packptq.config import ConfigError
from packptq.registry import Registry

#: builder name -> fn(cfg: ModelConfig, meta: dict) -> nn.Module ; "timm" is the fallback
BUILDERS: Registry[Callable[["ModelConfig", dict], nn.Module]] = Registry("model builder")


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a timm model name, or a registered builder (e.g. "pointnet")
    family: str = "auto"  # block-discovery rule; "auto" tries each
    pretrained: bool = False  # timm pretrained weights (needs the hub: not used offline)
    checkpoint: Optional[str] = None  # state dict (plain or a Lightning checkpoint)
    patch_size: Optional[int] = None  # ViT/DeiT/Swin patch size override for small inputs
    img_size: Optional[int] = None  # default: the datamodule's
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    # FP pre-training when neither a checkpoint nor pretrained weights are given
    train_epochs: int = 6
    train_batch_size: int = 64
    train_lr: float = 2e-3
    train_wd: float = 0.05

    def __post_init__(self) -> None:
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint={self.checkpoint} does not exist; give the path of a .pt/.ckpt file")


def _is_vit_like(name: str) -> bool:
    return any(k in name for k in ("vit", "deit", "swin", "beit", "eva"))


@BUILDERS.register("timm")
def build_timm(cfg: ModelConfig, meta: dict) -> nn.Module:
    import timm

    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:12]
        raise ConfigError(f"unknown model '{cfg.name}'; timm models like it: {close}")
    kw: Dict[str, Any] = dict(num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    img = cfg.img_size or meta.get("img_size")
    if _is_vit_like(cfg.name) and img is not None:
        kw["img_size"] = img
        if cfg.patch_size is not None:
            kw["patch_size"] = cfg.patch_size
    kw.update(cfg.kwargs)
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, **kw)


def build_model(cfg: ModelConfig, meta: dict) -> nn.Module:
    """Build the FP model for a dataset described by ``meta`` (num_classes, in_chans, img_size)."""
    builder = BUILDERS.get(cfg.name) if cfg.name in BUILDERS else BUILDERS.get("timm")
    model = builder(cfg, meta)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model.eval()


def load_checkpoint(model: nn.Module, path: str) -> dict:
    """Load a plain state dict, or the ``state_dict`` of a Lightning checkpoint (keys with a
    ``model.`` prefix are accepted), with ``weights_only=True``. Returns missing/unexpected keys."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    sd = obj.get("state_dict", obj)
    if any(k.startswith("model.") for k in sd) and not any(k in model.state_dict() for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    res = model.load_state_dict(sd, strict=False)
    report = {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
    if report["missing"] or report["unexpected"]:
        print(f"[packptq] checkpoint {path}: {len(report['missing'])} missing keys "
              f"{report['missing'][:5]}, {len(report['unexpected'])} unexpected keys {report['unexpected'][:5]}")
    own = model.state_dict()
    if len(report["missing"]) == len(own):
        raise ConfigError(f"checkpoint {path} shares no keys with {type(model).__name__}; wrong model?")
    return report
