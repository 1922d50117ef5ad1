"""A user's own preprocessed tensors in one ``.npz`` file.

Arrays: ``x`` float32 [N, C, H, W] (already preprocessed: nothing is applied to it), ``y``
integer [N]; optional 1-D integer index arrays ``train``, ``test`` (rows of x) and ``calib``
(rows of x that may calibrate; all must be training rows). ``meta()`` validates everything from
the array headers and the small arrays, so a bad file fails before ``x`` is read."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from packptq.config import ConfigError
from packptq.data.base import DATASETS, BaseDataModule, DataConfig, require_path, seeded_split, tensor_sets

_HINT = "pass data.path=/path/to/file.npz (arrays x [N,C,H,W] float32, y [N] int)"
_INDEX_KEYS = ("train", "test", "calib")


@dataclass
class NpzConfig(DataConfig):
    name: str = "npz"
    path: Optional[str] = None  # the .npz file
    n_test: int = 1000  # size of the seeded test split when the file has no train/test arrays
    num_classes: Optional[int] = None  # default: max(y) + 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require_path(self.path, "npz", _HINT, kind="file")
        if self.n_test < 1:
            raise ConfigError(f"data.n_test must be >= 1, got {self.n_test}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"data.num_classes must be >= 1, got {self.num_classes}")


def _npy_header(zf: zipfile.ZipFile, member: str) -> Optional[Tuple[tuple, np.dtype]]:
    """(shape, dtype) of one array in the archive from its header only; None for header
    versions numpy has no public reader for (the caller then loads the array)."""
    fmt = np.lib.format
    with zf.open(member) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            return None
    return tuple(shape), dtype


def _index_array(name: str, a: np.ndarray, n: int) -> np.ndarray:
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ConfigError(f"npz array '{name}' must be 1-D integer row indices, got {a.dtype} {list(a.shape)}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ConfigError(f"npz array '{name}' has indices outside [0, {n}) (min {a.min()}, max {a.max()})")
    if len(np.unique(a)) != len(a):
        raise ConfigError(f"npz array '{name}' repeats indices; each row may appear once")
    return a.astype(np.int64)


@DATASETS.register("npz")
class NpzData(BaseDataModule):
    """Preprocessed samples from a user's ``.npz``; calibration from ``calib`` (or any train row)."""

    Config = NpzConfig

    def __init__(self, cfg: NpzConfig) -> None:
        super().__init__(cfg)
        self.transform_desc = "none (preprocessed by the user)"
        self._split: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (train, test) rows of x
        self._calib: Optional[np.ndarray] = None  # allowed calibration rows of x

    def meta(self) -> dict:
        path = require_path(self.cfg.path, "npz", _HINT, kind="file")
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise ConfigError(f"data.path={path} is not an .npz archive (np.savez writes one)") from None
        with zf:
            members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
            missing = [k for k in ("x", "y") if k not in members]
            if missing:
                raise ConfigError(f"{path} lacks array(s) {missing}; it has {sorted(members)}")
            header = _npy_header(zf, members["x"])
            small: Dict[str, np.ndarray] = {}
            with np.load(path, allow_pickle=False) as npz:
                try:
                    for k in ("y",) + _INDEX_KEYS:
                        if k in members:
                            small[k] = npz[k]
                    if header is None:
                        x = npz["x"]
                        header = (x.shape, x.dtype)
                except ValueError as exc:  # object arrays need pickle: never load those
                    raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
        shape, dtype = header
        if len(shape) != 4 or dtype != np.float32:
            raise ConfigError(
                f"npz x must be float32 [N, C, H, W], got {dtype} {list(shape)}; "
                "save x.astype(np.float32) with channels first"
            )
        n, c, h, w = shape
        y = small["y"]
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise ConfigError(f"npz y must be 1-D integer class labels, got {y.dtype} {list(y.shape)}")
        if len(y) != n:
            raise ConfigError(f"npz x has {n} samples but y has {len(y)}; they must match")
        if n == 0:
            raise ConfigError(f"{path} holds no samples (x has N = 0)")
        if y.min() < 0:
            raise ConfigError(f"npz y has negative labels (min {y.min()}); labels are 0..num_classes-1")
        num_classes = self.cfg.num_classes if self.cfg.num_classes is not None else int(y.max()) + 1
        if y.max() >= num_classes:
            raise ConfigError(f"npz y has label {y.max()} but data.num_classes={num_classes}")

        idx = {k: _index_array(k, small[k], n) for k in _INDEX_KEYS if k in small}
        if "train" in idx or "test" in idx:
            # one given: the other is every remaining row
            rest = lambda a: np.setdiff1d(np.arange(n), a)  # noqa: E731
            train = idx["train"] if "train" in idx else rest(idx["test"])
            test = idx["test"] if "test" in idx else rest(idx["train"])
            shared = np.intersect1d(train, test)
            if len(shared):
                raise ConfigError(f"npz train and test indices share {len(shared)} rows (e.g. {shared[:3].tolist()})")
            if len(train) == 0 or len(test) == 0:
                raise ConfigError(f"npz split is empty: {len(train)} train rows, {len(test)} test rows")
        else:
            if self.cfg.n_test >= n:
                raise ConfigError(
                    f"data.n_test={self.cfg.n_test} leaves no training samples out of {n}; lower data.n_test"
                )
            tr, te = seeded_split(n, self.cfg.n_test, self.cfg.seed)
            train, test = tr.numpy(), te.numpy()
        pool = len(train)
        if "calib" in idx:
            outside = np.setdiff1d(idx["calib"], train)
            if len(outside):
                raise ConfigError(
                    f"npz calib has {len(outside)} rows outside the train split (e.g. {outside[:3].tolist()}); "
                    "calibration must use training samples only"
                )
            self._calib = idx["calib"]
            pool = len(self._calib)
        if self.cfg.calib_size > pool:
            where = "the npz calib array" if "calib" in idx else "the training split"
            raise ConfigError(
                f"data.calib_size={self.cfg.calib_size} is larger than {where} ({pool} samples); lower data.calib_size"
            )
        self._split = (train, test)
        self._y = y
        self.num_classes, self.in_chans, self.input_size = num_classes, c, (c, h, w)
        return {"num_classes": num_classes, "in_chans": c, "img_size": h if h == w else (h, w)}

    def _load(self) -> Tuple[Dataset, Dataset]:
        self.meta()
        with np.load(self.cfg.path, allow_pickle=False) as npz:
            x = torch.from_numpy(npz["x"])
        if not torch.isfinite(x).all():
            raise ConfigError(f"npz x at {self.cfg.path} contains NaN or inf values")
        train, test = (torch.from_numpy(a) for a in self._split)
        return tensor_sets(x, torch.from_numpy(self._y.astype(np.int64)), train, test)

    def calib_indices(self) -> torch.Tensor:
        """Positions in the train split; a seeded subset of ``calib`` rows when the file has one."""
        self.setup()
        if self._calib is None:
            return super().calib_indices()
        train = self._split[0]
        pos_of_row = np.full(int(train.max()) + 1, -1, dtype=np.int64)
        pos_of_row[train] = np.arange(len(train))
        pos = torch.from_numpy(pos_of_row[self._calib])
        g = torch.Generator().manual_seed(self.cfg.seed)
        return pos[torch.randperm(len(pos), generator=g)[: self.cfg.calib_size]]
