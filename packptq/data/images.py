"""Image folders (``path/train/<class>/<image>``, ``path/val/<class>/<image>``) and ImageNet.

Preprocessing follows the model: ``attach_model`` builds timm's eval transform from the model's
own data config (mean, std, interpolation, crop), and uses it for train and calibration images
too, since PTQ calibrates under evaluation preprocessing. The input size is ``data.img_size``
(shorter side resized, then a centre crop) when given; left null, an image folder keeps its
images' own size (that of the first training image; others are resized to it) and ImageNet takes
the model's own input size. A model built for one fixed size (a ViT's patch embedding) gets
that size. Before a model is attached, the same size with ImageNet mean/std is used."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from packptq.config import ConfigError
from packptq.data.base import DATASETS, BaseDataModule, DataConfig, require_path

_HINT = "pass data.path=/folder with train/<class>/*.jpg and val/<class>/*.jpg"
_IMAGENET_HINT = "set IMAGENET_DIR or data.path (a folder with train/<wnid>/ and val/<wnid>/)"


def _extensions() -> Tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "imagefolder"
    path: Optional[str] = None  # folder holding train/ and val/
    img_size: Optional[int] = None  # square input side in pixels; null: the images' own size

    def _hint(self) -> str:
        return _HINT

    def __post_init__(self) -> None:
        super().__post_init__()
        require_path(self.path, self.name, self._hint(), kind="dir")
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"data.img_size must be >= 1, got {self.img_size}")


@dataclass
class ImageNetConfig(ImageFolderConfig):
    name: str = "imagenet"
    calib_size: int = 1024
    batch_size: int = 64
    num_workers: int = 4

    def _hint(self) -> str:
        return _IMAGENET_HINT


class _Images(Dataset):
    """(path, label) samples decoded to RGB and passed through ``transform``; returns
    (x [3, H, W] float32, label int)."""

    def __init__(self, samples: List[Tuple[str, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import pil_loader

        path, label = self.samples[i]
        try:
            img = pil_loader(path)
        except (OSError, ValueError) as exc:  # truncated or not an image at all
            raise ConfigError(f"image {path} cannot be decoded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                              "remove or replace the file") from None
        return self.transform(img), label


def _class_dirs(split_dir: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: Path, exts: Tuple[str, ...]) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(exts) for f in files):
            return True
    return False


@DATASETS.register("imagefolder")
class ImageFolderData(BaseDataModule):
    """Class-folder images; labels are the sorted ``train/`` class folder names."""

    Config = ImageFolderConfig
    #: with data.img_size null: keep the images' own size (False: the model's input size)
    OWN_SIZE = True
    #: the input side when neither data.img_size nor the images give one (before a model is attached)
    DEFAULT_SIZE = 224

    def __init__(self, cfg: ImageFolderConfig) -> None:
        super().__init__(cfg)
        self.classes: Optional[List[str]] = None
        self._own: Optional[Tuple[int, int]] = None
        self.input_size = (3, *(self._size() or (self.DEFAULT_SIZE,) * 2))  # attach_model may change it
        self._set_transform(self._default_transform())

    # -- transforms -----------------------------------------------------------------------
    def _size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of the input: data.img_size squared, else the images' own size (OWN_SIZE), else
        None (the model decides)."""
        if self.cfg.img_size is not None:
            return (self.cfg.img_size, self.cfg.img_size)
        if not self.OWN_SIZE:
            return None
        if self._own is None:
            self._own = self._first_image_size()
        return self._own

    def _first_image_size(self) -> Tuple[int, int]:
        """(H, W) of the first training image (sorted class folders and files); only its header is read."""
        from PIL import Image

        classes = self._check_tree()
        train, exts = self._split_dir("train"), _extensions()
        for c in classes:
            for dirpath, dirs, files in os.walk(train / c, followlinks=True):
                dirs.sort()
                for f in sorted(files):
                    if f.lower().endswith(exts):
                        path = os.path.join(dirpath, f)
                        try:
                            with Image.open(path) as img:
                                w, h = img.size
                        except (OSError, ValueError) as exc:
                            raise ConfigError(f"image {path} cannot be read ({type(exc).__name__}); remove or "
                                              "replace the file") from None
                        return (h, w)
        raise ConfigError(f"no images ({', '.join(exts)}) under {train}")

    def _own_size(self) -> bool:
        return self.cfg.img_size is None and self.OWN_SIZE

    def _default_transform(self) -> Callable:
        import timm.data

        size = self._size() or (self.DEFAULT_SIZE,) * 2
        cfg = timm.data.resolve_data_config({"input_size": (3, *size)})
        if self._own_size():
            cfg["crop_pct"] = 1.0  # the image as it is: no resize, no crop
        return timm.data.create_transform(**cfg, is_training=False)

    def _set_transform(self, transform: Callable) -> None:
        self.transform = transform
        # the repr lists resize, crop, interpolation, mean and std: enough to tell transforms apart
        self.transform_desc = repr(transform)
        for ds in (self.train_set, self.test_set):
            if ds is not None:
                ds.transform = transform

    def attach_model(self, model: torch.nn.Module) -> None:
        """Use the model's timm data config (eval transform) for every split, at the input size of
        ``_size`` (the model's own when that is None or the model takes one fixed size)."""
        import timm.data

        args = None
        # ViT/Swin built for another img_size keep the pretrained 224 in their data config but
        # reject other sizes: their patch embedding's fixed size is the one that runs.
        fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if fixed is not None and not getattr(model, "dynamic_img_size", False):
            args = {"input_size": (3, *tuple(fixed))}
        cfg = timm.data.resolve_model_data_config(model, args=args)
        size = self._size()
        if args is None and size is not None:  # data.img_size, or the images' own size
            cfg["input_size"] = (3, *size)
            if self._own_size():
                cfg["crop_pct"] = 1.0
        self._set_transform(timm.data.create_transform(**cfg, is_training=False))
        self.input_size = tuple(cfg["input_size"])
        self.data_config = cfg

    def train_transform(self) -> Callable:
        """The calibration images' augmentation for ``data.calib_transform=train``: a random
        resized crop to the input size (scale 0.08..1) and a horizontal flip, then the model's
        normalisation; sizes, interpolation, mean and std from the model's timm data config (the
        official Pack-PTQ code calibrates on RandomResizedCrop + flip training images)."""
        import timm.data
        from torchvision import transforms

        cfg = getattr(self, "data_config", None) or timm.data.resolve_data_config({"input_size": self.input_size})
        interp = timm.data.transforms.str_to_interp_mode(cfg.get("interpolation", "bilinear"))
        return transforms.Compose([transforms.RandomResizedCrop(tuple(cfg["input_size"][1:]), interpolation=interp),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   transforms.Normalize(cfg["mean"], cfg["std"])])

    def calib_samples(self, idx) -> list:
        """The training images ``idx`` decoded under ``train_transform`` (the split's own
        transform is left as it was)."""
        ds, eval_t = self.train_set, self.train_set.transform
        ds.transform = self.train_transform()
        try:
            return [ds[i] for i in idx]
        finally:
            ds.transform = eval_t

    # -- metadata ---------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path:
        root = require_path(self.cfg.path, self.cfg.name, self.cfg._hint(), kind="dir")
        d = root / split
        if not d.is_dir():
            raise ConfigError(f"{root} has no {split}/ folder; expected {split}/<class>/<image> ({self.cfg._hint()})")
        return d

    def meta(self) -> dict:
        classes = self._check_tree()
        h, w = self._size() or (self.DEFAULT_SIZE,) * 2
        s = h if h == w else (h, w)
        self.num_classes, self.in_chans = len(classes), 3
        return {"num_classes": len(classes), "in_chans": 3, "img_size": s}

    def _check_tree(self) -> List[str]:
        """The class names of train/, after checking the folder layout (one ConfigError line)."""
        exts = _extensions()
        train, val = self._split_dir("train"), self._split_dir("val")
        classes = _class_dirs(train)
        if not classes:
            raise ConfigError(f"{train} has no class folders; expected {train}/<class>/<image>")
        val_classes = _class_dirs(val)
        if not val_classes:
            raise ConfigError(f"{val} has no class folders; expected {val}/<class>/<image>")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise ConfigError(f"{val} has class folders not in train/: {unknown[:5]}")
        # one image found is enough here; the full scan (and per-class check) is in _load
        for d in (train, val):
            if not _has_image(d, exts):
                raise ConfigError(f"no images ({', '.join(exts)}) under {d}")
        self.classes = classes
        return classes

    def _load(self) -> Tuple[Dataset, Dataset]:
        from torchvision.datasets.folder import make_dataset

        self.meta()
        root = Path(str(self.cfg.path)).expanduser()
        to_idx = {c: i for i, c in enumerate(self.classes)}
        sets = []
        for split in ("train", "val"):
            samples = make_dataset(root / split, to_idx, extensions=_extensions(), allow_empty=True)
            if split == "train":
                # an empty class folder means a broken copy: its label could never be learned
                seen = {label for _, label in samples}
                empty = [c for c, i in to_idx.items() if i not in seen]
                if empty:
                    raise ConfigError(f"class folder(s) with no images under {root / split}: {empty[:5]}")
            if not samples:
                raise ConfigError(f"no images under {root / split}")
            sets.append(_Images(samples, self.transform))
        return sets[0], sets[1]

    def source_desc(self):
        """The calibration images as (path relative to data.path, size in bytes)."""
        self.setup()
        root = Path(str(self.cfg.path)).expanduser()
        out = []
        for i in self.calib_indices().tolist():
            p = self.train_set.samples[i][0]
            out.append((os.path.relpath(p, root), os.path.getsize(p)))
        return out


@DATASETS.register("imagenet")
class ImageNetData(ImageFolderData):
    """ILSVRC-2012 in class-folder layout (``train/n01440764/...``, ``val/n01440764/...``)."""

    Config = ImageNetConfig
    OWN_SIZE = False  # ImageNet's images differ in size: the model's input size serves
