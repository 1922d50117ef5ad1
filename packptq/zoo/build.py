"""Model builders: timm models by name (adapted to the datamodule's input), our PointNet,
and checkpoint loading."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from omegaconf import MISSING

from packptq.config import ConfigError
from packptq.registry import Registry

log = logging.getLogger("packptq")

#: builder name -> fn(cfg: ModelConfig, meta: dict) -> nn.Module ; "timm" is the fallback
BUILDERS: Registry[Callable[["ModelConfig", dict], nn.Module]] = Registry("model builder")


@dataclass
class ModelConfig:
    name: str = MISSING  # a timm model name, or a registered builder (e.g. "pointnet"); required
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
    # a checkpoint's missing or unexpected keys are an error; false loads what matches (the rest
    # keeps its random initialisation) and prints the keys
    strict: bool = True

    def __post_init__(self) -> None:
        from packptq.zoo.split import SPLIT_RULES

        if self.family != "auto" and self.family not in SPLIT_RULES:
            raise ConfigError(f"unknown model.family '{self.family}'; known: auto, {', '.join(SPLIT_RULES.names())}")
        if self.train_epochs < 1:
            raise ConfigError(f"model.train_epochs must be >= 1 (0 trains nothing), got {self.train_epochs}")
        if self.train_batch_size < 1:
            raise ConfigError(f"model.train_batch_size must be >= 1, got {self.train_batch_size}")
        if not self.train_lr > 0 or self.train_lr != self.train_lr or self.train_lr == float("inf"):
            raise ConfigError(f"model.train_lr must be a finite number > 0, got {self.train_lr}")
        if not 0 <= self.train_wd < float("inf"):
            raise ConfigError(f"model.train_wd must be a finite number >= 0, got {self.train_wd}")
        for key in ("patch_size", "img_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
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
    if not cfg.pretrained:
        return timm.create_model(cfg.name, **kw)
    try:
        with _hub_cache_only(not _hub_reachable()):
            return timm.create_model(cfg.name, pretrained=True, **kw)
    except (OSError, RuntimeError, ValueError) as exc:  # hub unreachable, weights not in the local cache
        raise ConfigError(f"model.pretrained=true: timm could not get {cfg.name}'s pretrained weights "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); offline, give "
                          f"model.checkpoint=PATH, or model.pretrained=false to train on the data") from None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub accepts a connection within ``timeout`` seconds (always True
    behind a proxy, which a direct connection cannot judge)."""
    import os
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_cache_only(offline: bool):
    """huggingface_hub reads only its local cache while ``offline``: unreachable, it would retry
    the download for about a minute before giving up."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def build_model(cfg: ModelConfig, meta: dict) -> nn.Module:
    """Build the FP model for a dataset described by ``meta`` (num_classes, in_chans, img_size).

    With a checkpoint, the shapes it was trained with win over the config's defaults: the class
    count, a ViT's patch size and its image size are read from the checkpoint's tensors and the
    model is built with them (so ``model=deit_tiny_patch16_224 model.checkpoint=PATH`` works with
    whatever patch size the checkpoint used). ``meta["num_classes"]`` is updated in place when the
    checkpoint's head has more classes than the data's labels show; fewer is an error."""
    builder = BUILDERS.get(cfg.name) if cfg.name in BUILDERS else BUILDERS.get("timm")
    if not cfg.checkpoint:
        return builder(cfg, meta).eval()
    sd = read_state_dict(cfg.checkpoint)
    model = builder(cfg, meta)
    if shape_mismatches(model, sd):
        cfg, n_classes = _shapes_from_checkpoint(cfg, meta, model, sd)
        if n_classes != meta["num_classes"]:
            log.info("checkpoint head has %d classes (data labels: %d); using %d", n_classes, meta["num_classes"],
                     n_classes)
            meta["num_classes"] = n_classes
        model = builder(cfg, meta)
    load_checkpoint(model, cfg.checkpoint, sd, strict=cfg.strict)
    return model.eval()


def resolved_config(cfg: ModelConfig, meta: dict) -> Tuple[ModelConfig, dict]:
    """The builder config and meta that ``build_model(cfg, meta)`` ends up using, without a
    weight source: with a checkpoint, its shapes (classes, patch and image size) are read as
    ``build_model`` does, so building from the result gives the checkpoint's architecture."""
    meta = dict(meta)
    if cfg.checkpoint:
        builder = BUILDERS.get(cfg.name) if cfg.name in BUILDERS else BUILDERS.get("timm")
        sd = read_state_dict(cfg.checkpoint)
        model = builder(cfg, meta)
        if shape_mismatches(model, sd):
            cfg, meta["num_classes"] = _shapes_from_checkpoint(cfg, meta, model, sd)
    return replace(cfg, checkpoint=None, pretrained=False), meta


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a plain state dict or of a Lightning checkpoint's ``state_dict``, read with
    ``weights_only=True``. A ``model.`` (LightningModule) or ``module.`` (DataParallel) prefix on
    every key is removed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if first.startswith("Weights only load failed"):  # torch's advice (weights_only=False) is unsafe
            first = "not a file of tensors saved with torch.save (corrupt, or it pickles other objects)"
        raise ConfigError(f"cannot read checkpoint {path}: {first}; give model.checkpoint= a state dict saved "
                          "with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"checkpoint {path} holds no tensors (keys {list(obj)[:5]}); expected a state dict")
    for prefix in ("model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"checkpoint {path} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                          f"{bad[:5]}")
    return sd


def shape_mismatches(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
    """Keys present in both whose shapes differ: name -> (model shape, checkpoint shape)."""
    own = model.state_dict()
    return {k: (tuple(own[k].shape), tuple(v.shape)) for k, v in sd.items()
            if k in own and own[k].shape != v.shape}


def _classifier_key(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        for name, mod in model.named_modules():
            if mod is head:
                return f"{name}.weight"
    return None


def _shapes_from_checkpoint(cfg: ModelConfig, meta: dict, model: nn.Module,
                            sd: Dict[str, torch.Tensor]) -> Tuple[ModelConfig, int]:
    """(config with the patch and image size the checkpoint was built with, its class count),
    read from the ``patch_embed.proj``, ``pos_embed`` and classifier tensors."""
    n_classes = meta["num_classes"]
    head = _classifier_key(model)
    if head and head in sd:
        n_classes = int(sd[head].shape[0])
        if n_classes < meta["num_classes"]:
            raise ConfigError(f"checkpoint {cfg.checkpoint} has a {n_classes}-class head but the data has "
                              f"labels up to {meta['num_classes'] - 1}; wrong checkpoint or data?")
    proj = sd.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4 and proj.shape[-1] == proj.shape[-2]:
        patch = int(proj.shape[-1])
        over = {"patch_size": patch}
        pos, prefix = sd.get("pos_embed"), int(getattr(model, "num_prefix_tokens", 0))
        if pos is not None and pos.dim() == 3:
            grid = round((pos.shape[1] - prefix) ** 0.5)
            if grid * grid == pos.shape[1] - prefix:
                img = grid * patch
                data_img = meta.get("img_size")
                if data_img is not None and data_img != img:
                    raise ConfigError(f"checkpoint {cfg.checkpoint} was built for {img}x{img} inputs "
                                      f"(pos_embed has {grid}x{grid} patches of {patch}); the data gives "
                                      f"{data_img}: resize the data or use a matching checkpoint")
                over["img_size"] = img
        cfg = replace(cfg, **over)
    return cfg, n_classes


def load_checkpoint(model: nn.Module, path: str, sd: Dict[str, torch.Tensor], strict: bool = True) -> dict:
    """Load the tensors ``sd`` read from ``path`` (``read_state_dict``) into ``model``; shapes must
    match. Missing or unexpected keys are a ConfigError naming them, unless ``strict`` is False
    (then they are printed). Returns the missing and unexpected keys."""
    bad = shape_mismatches(model, sd)
    if bad:
        lines = ", ".join(f"{k} model {a} vs checkpoint {b}" for k, (a, b) in list(bad.items())[:4])
        raise ConfigError(f"checkpoint {path} does not fit {type(model).__name__} built for this data "
                          f"({len(bad)} shape mismatches: {lines}); check model=, data.num_classes, "
                          f"model.img_size, model.patch_size and the data's channels")
    res = model.load_state_dict(sd, strict=False)
    report = {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
    own = model.state_dict()
    if len(report["missing"]) == len(own):
        raise ConfigError(f"checkpoint {path} shares no keys with {type(model).__name__}; wrong model?")
    if strict and (report["missing"] or report["unexpected"]):
        raise ConfigError(f"checkpoint {path} does not match {type(model).__name__}: "
                          f"{len(report['missing'])} missing keys {report['missing'][:5]}, "
                          f"{len(report['unexpected'])} unexpected keys {report['unexpected'][:5]}; "
                          "model.strict=false loads the matching ones and keeps the rest as initialised")
    if report["missing"] or report["unexpected"]:
        log.warning(f"checkpoint {path}: {len(report['missing'])} missing keys {report['missing'][:5]}, "
                    f"{len(report['unexpected'])} unexpected keys {report['unexpected'][:5]}")
    return report
