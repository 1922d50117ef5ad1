"""The datamodule contract every dataset follows.

A datamodule knows its metadata (classes, channels, input size) cheaply, before the model
exists, and fails fast on bad input. Calibration samples always come from the training split,
chosen by a seeded permutation; the fingerprint identifies exactly which samples and transform."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from packptq.config import ConfigError
from packptq.registry import Registry, UnknownName

DATASETS: Registry[type] = Registry("dataset")

#: config keys that change how data is served, not which samples calibrate: left out of the
#: fingerprint so a run moved to another machine (other path, more workers) still matches.
RUNTIME_KEYS = ("batch_size", "num_workers", "path")


#: ``data.calib_transform`` choices
CALIB_TRANSFORMS = ("eval", "train")


@dataclass
class DataConfig:
    name: str = "mnist5k"
    calib_size: int = 256
    batch_size: int = 256  # evaluation / FP-training batch
    num_workers: int = 0
    seed: int = 0  # split seed (and calibration seed when calib_seed is null)
    calib_seed: Optional[int] = None  # which training samples calibrate; the configs use ${seed}
    # training samples held out as the validation split (hyper-parameters are chosen on it): drawn
    # with the split seed, never calibrated on; 0 = no validation split
    val_size: int = 0
    # preprocessing of the calibration images: eval (the evaluation transform) | train (a random
    # resized crop + horizontal flip of each image, drawn with the calibration seed: the official
    # Pack-PTQ code calibrates on its training loader's augmented images)
    calib_transform: str = "eval"

    def __post_init__(self) -> None:
        if self.calib_size < 1:
            raise ConfigError(f"data.calib_size must be >= 1, got {self.calib_size}")
        if self.val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0, got {self.val_size}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.calib_transform not in CALIB_TRANSFORMS:
            raise ConfigError(f"data.calib_transform={self.calib_transform}; use {'|'.join(CALIB_TRANSFORMS)}")
        for key in ("seed", "calib_seed"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < 2 ** 63:
                raise ConfigError(f"data.{key} must be in [0, 2**63), got {v}")


class BaseDataModule(L.LightningDataModule):
    """Subclasses set ``Config`` and implement ``_load()`` returning (train_set, test_set)."""

    Config = DataConfig
    #: filled by ``meta()`` / ``setup()``
    num_classes: int
    in_chans: int
    input_size: Tuple[int, ...]  # one sample's shape, e.g. (1, 28, 28) or (1024, 3)

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.transform_desc = "none"
        self._content_digest: Optional[str] = None

    # -- metadata -----------------------------------------------------------------------
    def meta(self) -> dict:
        """num_classes, in_chans, img_size (None for point clouds); cheap, validates paths."""
        raise NotImplementedError

    def attach_model(self, model: torch.nn.Module) -> None:
        """Datasets whose transform follows the model's timm data config hook in here."""

    # -- data -----------------------------------------------------------------------------
    def _load(self) -> Tuple[Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set, self.test_set = self._load()
            self._check_classes()
            if self.cfg.calib_size + self.cfg.val_size > len(self.train_set):
                raise ConfigError(
                    f"data.calib_size={self.cfg.calib_size}" + (f" + data.val_size={self.cfg.val_size}"
                                                                if self.cfg.val_size else "")
                    + f" is larger than the training split ({len(self.train_set)} samples); lower it"
                )

    def _check_classes(self) -> None:
        """A classifier needs two classes: data whose class count (``meta()``) or whose training
        labels (in-memory datasets) show one is a ConfigError before any training."""
        n = getattr(self, "num_classes", None)
        tensors = getattr(self.train_set, "tensors", ())
        labels = tensors[1] if len(tensors) > 1 else None
        distinct = labels.unique().tolist() if labels is not None and len(labels) else None
        if (n is not None and n < 2) or (distinct is not None and len(distinct) < 2):
            only = f"every training label is {distinct[0]}" if distinct else f"{n} class"
            raise ConfigError(f"data {self.cfg.name}: {only}; a classifier needs at least two classes "
                              "(check the labels of the data)")

    def val_indices(self) -> torch.Tensor:
        """Training-split indices of the validation split (``data.val_size`` of them, drawn with
        the split seed: the same for every run seed)."""
        self.setup()
        if not self.cfg.val_size:
            return torch.zeros(0, dtype=torch.long)
        g = torch.Generator().manual_seed(self.cfg.seed + 7919)
        return torch.randperm(len(self.train_set), generator=g)[: self.cfg.val_size]

    def calib_indices(self) -> torch.Tensor:
        """Training-split indices of the calibration set, drawn with the calibration seed from
        the samples outside the validation split."""
        self.setup()
        g = torch.Generator().manual_seed(self._calib_seed())
        perm = torch.randperm(len(self.train_set), generator=g)
        if self.cfg.val_size:
            held = torch.zeros(len(self.train_set), dtype=torch.bool)
            held[self.val_indices()] = True
            perm = perm[~held[perm]]
        return perm[: self.cfg.calib_size]

    def calib_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the calibration set, stacked: x [n, *input_size], y [n] int64. With
        ``data.calib_transform=train`` each image is augmented (``calib_samples``), the random
        draws seeded by the calibration seed, so the set is the same on every call."""
        self.setup()
        idx = self.calib_indices().tolist()
        if self.cfg.calib_transform == "train":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._calib_seed())
                xs, ys = zip(*self.calib_samples(idx))
        else:
            xs, ys = zip(*(self.train_set[i] for i in idx))
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)

    def _calib_seed(self) -> int:
        return self.cfg.seed if self.cfg.calib_seed is None else self.cfg.calib_seed

    def calib_samples(self, idx) -> list:
        """The (x, y) training samples ``idx`` under the training augmentation
        (``data.calib_transform=train``): here a random resized crop (scale 0.08..1, aspect
        3/4..4/3, back to the sample's size) and a horizontal flip with probability 0.5 of each
        stored image tensor [C, H, W]. Datasets that decode files override it."""
        if len(self.input_size) != 3:
            raise ConfigError(f"data.calib_transform=train augments images; {self.cfg.name} samples have shape "
                              f"{tuple(self.input_size)}: use data.calib_transform=eval")
        from torchvision import transforms

        aug = transforms.Compose([transforms.RandomResizedCrop(tuple(self.input_size[1:]), antialias=True),
                                  transforms.RandomHorizontalFlip()])
        return [(aug(torch.as_tensor(x)), y) for x, y in (self.train_set[i] for i in idx)]

    def source_desc(self) -> Any:
        """What identifies the calibration samples themselves, beyond the config: for in-memory
        tensor datasets a SHA-256 of the calibration rows (x and y bytes). Datasets served from
        files override this (e.g. relative file names and sizes). JSON-serialisable."""
        self.setup()
        if not isinstance(self.train_set, TensorDataset):
            return None
        idx = self.calib_indices()
        h = hashlib.sha256()
        for t in self.train_set.tensors:
            h.update(t[idx].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def content_digest(self) -> str:
        """What identifies the training samples' content (the FP model trained on them): a
        SHA-256 over every tensor of an in-memory training split, else ``source_desc()`` with the
        split sizes. 16 hex characters; computed once per datamodule (it reads the whole split)."""
        if self._content_digest is not None:
            return self._content_digest
        self.setup()
        h = hashlib.sha256()
        if isinstance(self.train_set, TensorDataset):
            for t in self.train_set.tensors:
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.contiguous().numpy().tobytes())
        else:
            h.update(json.dumps([self.source_desc(), len(self.train_set), self.transform_desc],
                                sort_keys=True, default=str).encode())
        self._content_digest = h.hexdigest()[:16]
        return self._content_digest

    def fingerprint(self) -> str:
        """Hash of dataset config (minus RUNTIME_KEYS), transform, calibration count, seed, the
        chosen indices and ``source_desc()``; 16 hex characters."""
        desc = {
            # no validation split and the eval transform leave the fingerprint of configs without
            # those keys unchanged
            "cfg": {k: v for k, v in asdict(self.cfg).items()
                    if k not in RUNTIME_KEYS and not (k == "val_size" and not v)
                    and not (k == "calib_transform" and v == "eval")},
            "transform": self.transform_desc,
            "calib_idx": self.calib_indices().tolist(),
            "source": self.source_desc(),
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(
            ds, batch_size=self.cfg.batch_size, shuffle=shuffle, num_workers=self.cfg.num_workers,
            generator=g if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split (``data.val_size`` training samples; empty when 0)."""
        self.setup()
        return self._loader(Subset(self.train_set, self.val_indices().tolist()), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)


def require_path(path: Optional[str], dataset: str, hint: str, kind: str = "any") -> Path:
    """Check a user-given data path exists (``kind``: "any", "dir" or "file"), else raise one
    ConfigError line naming the dataset and ``hint`` (how to set it). Returns the expanded Path."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"data.path is required for dataset '{dataset}': {hint}")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path={path} does not exist (dataset '{dataset}'): {hint}")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"data.path={path} is a file; dataset '{dataset}' needs a folder: {hint}")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"data.path={path} is a folder; dataset '{dataset}' needs a file: {hint}")
    return p


def seeded_split(n: int, n_test: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed-seed permutation split of range(n) into (train_idx, test_idx)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return perm[n_test:], perm[:n_test]


def tensor_sets(x: torch.Tensor, y: torch.Tensor, train_idx, test_idx) -> Tuple[Dataset, Dataset]:
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def build_datamodule(section: Any) -> BaseDataModule:
    """Build the datamodule named by ``section.name``, validating its keys strictly."""
    from packptq.config import typed

    name = section["name"] if section is not None else None
    if name not in DATASETS:
        raise UnknownName(f"unknown data.name '{name}'; known: {', '.join(DATASETS.names())}")
    cls = DATASETS.get(name)
    return cls(typed(cls.Config, section, "data"))
