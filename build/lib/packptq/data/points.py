"""Point-cloud datasets: ModelNet40 (the standard HDF5 release) and ``shapes``, a synthetic
set generated in memory so PointNet runs offline. A sample is x [num_points, 3] float32
(point-major, coordinates in the object's own units, unit sphere after normalisation) and an
int64 label."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from packptq.config import ConfigError
from packptq.data.base import DATASETS, BaseDataModule, DataConfig, require_path


def unit_sphere(x: np.ndarray) -> np.ndarray:
    """Centre each cloud at its centroid and scale its farthest point to radius 1; x [..., P, 3]."""
    x = x - x.mean(axis=-2, keepdims=True)
    r = np.linalg.norm(x, axis=-1).max(axis=-1)[..., None, None]
    return x / np.maximum(r, 1e-12)


# ---------------------------------------------------------------------------------------------
# ModelNet40
# ---------------------------------------------------------------------------------------------
_MN_HINT = "set MODELNET40_DIR or data.path (the folder of ply_data_train*.h5 / ply_data_test*.h5)"


@dataclass
class ModelNet40Config(DataConfig):
    name: str = "modelnet40"
    path: Optional[str] = None  # folder of the HDF5 files (modelnet40_ply_hdf5_2048)
    num_points: int = 1024  # the first num_points of each cloud (the release stores 2048)
    normalize: bool = True  # centre and scale each cloud to the unit sphere
    num_classes: int = 40
    batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        require_path(self.path, "modelnet40", _MN_HINT, kind="dir")
        if self.num_points < 1:
            raise ConfigError(f"data.num_points must be >= 1, got {self.num_points}")
        if self.num_classes < 1:
            raise ConfigError(f"data.num_classes must be >= 1, got {self.num_classes}")


def _natural_key(p: Path):
    # ply_data_train10.h5 after ply_data_train9.h5
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


@DATASETS.register("modelnet40")
class ModelNet40(BaseDataModule):
    """ModelNet40 from ``ply_data_{train,test}*.h5`` (``data`` [N, P, 3], ``label`` [N, 1])."""

    Config = ModelNet40Config

    def __init__(self, cfg: ModelNet40Config) -> None:
        super().__init__(cfg)
        self.transform_desc = f"first {cfg.num_points} points" + (", unit sphere" if cfg.normalize else "")
        self._files: Dict[str, List[Path]] = {}

    def meta(self) -> dict:
        """Checks files, dataset names, shapes and dtypes from the HDF5 headers (no data read)."""
        import h5py

        root = require_path(self.cfg.path, "modelnet40", _MN_HINT, kind="dir")
        counts = {}
        for split in ("train", "test"):
            files = sorted(root.glob(f"ply_data_{split}*.h5"), key=_natural_key)
            if not files:
                raise ConfigError(f"no ply_data_{split}*.h5 files in {root} ({_MN_HINT})")
            n = 0
            for f in files:
                try:
                    h = h5py.File(f, "r")
                except OSError as exc:
                    raise ConfigError(f"cannot open {f} as HDF5: {str(exc).splitlines()[0]}") from None
                with h:
                    for key in ("data", "label"):
                        if key not in h:
                            raise ConfigError(f"{f} has no '{key}' dataset (has {sorted(h.keys())})")
                    d, lab = h["data"], h["label"]
                    if d.ndim != 3 or d.shape[2] != 3 or d.dtype.kind != "f":
                        raise ConfigError(f"{f}: 'data' must be float [N, points, 3], got {d.dtype} {list(d.shape)}")
                    if lab.dtype.kind not in "iu" or lab.shape[0] != d.shape[0] or lab.size != d.shape[0]:
                        raise ConfigError(
                            f"{f}: 'label' must be integer [N, 1] with N = {d.shape[0]}, got {lab.dtype} {list(lab.shape)}"
                        )
                    if d.shape[1] < self.cfg.num_points:
                        raise ConfigError(
                            f"{f} stores {d.shape[1]} points per cloud; data.num_points={self.cfg.num_points} is too many"
                        )
                    n += d.shape[0]
            self._files[split], counts[split] = files, n
        if self.cfg.calib_size > counts["train"]:
            raise ConfigError(
                f"data.calib_size={self.cfg.calib_size} is larger than the training split "
                f"({counts['train']} clouds); lower data.calib_size"
            )
        self.num_classes, self.in_chans, self.input_size = self.cfg.num_classes, 3, (self.cfg.num_points, 3)
        return {"num_classes": self.cfg.num_classes, "in_chans": 3, "img_size": None}

    def _read(self, files: List[Path]) -> Tuple[torch.Tensor, torch.Tensor]:
        import h5py

        xs, ys = [], []
        for f in files:
            with h5py.File(f, "r") as h:
                # slicing in h5py reads only the first num_points of every cloud
                xs.append(np.asarray(h["data"][:, : self.cfg.num_points, :], dtype=np.float32))
                ys.append(np.asarray(h["label"][...]).reshape(-1).astype(np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        if y.min() < 0 or y.max() >= self.cfg.num_classes:
            raise ConfigError(
                f"labels in {files[0].parent} span [{y.min()}, {y.max()}], outside data.num_classes={self.cfg.num_classes}"
            )
        if self.cfg.normalize:
            x = unit_sphere(x).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _load(self) -> Tuple[Dataset, Dataset]:
        self.meta()
        return TensorDataset(*self._read(self._files["train"])), TensorDataset(*self._read(self._files["test"]))


# ---------------------------------------------------------------------------------------------
# shapes: synthetic primitives
# ---------------------------------------------------------------------------------------------
def _tri_mesh(vertices, faces) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    """A sampler of points uniform over a triangle mesh's surface (faces chosen by area)."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces)]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    p = area / area.sum()

    def sample(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
        f = rng.choice(len(tri), size=(m, n), p=p)
        u, w = rng.random((2, m, n, 1))
        su = np.sqrt(u)  # sqrt makes barycentric sampling uniform over the triangle
        a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
        return (1 - su) * a + su * (1 - w) * b + su * w * c

    return sample


def _sphere(rng, m, n):
    g = rng.standard_normal((m, n, 3))
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def _ellipsoid(rng, m, n):
    # axis ratios well beyond the random anisotropic scale, so it never passes for a sphere
    return _sphere(rng, m, n) * np.array([1.0, 0.55, 0.3])


def _cylinder(rng, m, n):
    # radius 1, height 2: lateral area 4*pi, the two caps 2*pi together
    t = rng.uniform(0, 2 * np.pi, (m, n))
    on_side = rng.random((m, n)) < 2 / 3
    r = np.where(on_side, 1.0, np.sqrt(rng.random((m, n))))
    z = np.where(on_side, rng.uniform(-1, 1, (m, n)), np.sign(rng.random((m, n)) - 0.5))
    return np.stack([r * np.cos(t), r * np.sin(t), z], axis=-1)


def _cone(rng, m, n):
    # radius 1, height 2: lateral area pi*sqrt(5), base pi; lateral radius grows as sqrt(u)
    t = rng.uniform(0, 2 * np.pi, (m, n))
    on_side = rng.random((m, n)) < np.sqrt(5) / (np.sqrt(5) + 1)
    s = np.sqrt(rng.random((m, n)))
    z = np.where(on_side, 1 - 2 * s, -1.0)
    return np.stack([s * np.cos(t), s * np.sin(t), z], axis=-1)


def _torus(rng, m, n, big=1.0, small=0.35):
    u, v = rng.uniform(0, 2 * np.pi, (2, m, n))
    ring = big + small * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], axis=-1)


_CUBE_V = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
_CUBE_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
           (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]
_TETRA_V = [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]
_TETRA_F = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
_OCTA_V = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_OCTA_F = [(a, b, c) for a in (0, 1) for b in (2, 3) for c in (4, 5)]
_PYR_V = [(-1, -1, -1), (1, -1, -1), (1, 1, -1), (-1, 1, -1), (0, 0, 1)]
_PYR_F = [(0, 1, 2), (0, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)]
_SQUARE_V = [(-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0)]
_SQUARE_F = [(0, 1, 2), (0, 2, 3)]

#: class name -> sampler(rng, m clouds, n points) -> [m, n, 3]; the order is the label
SHAPES: Dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "sphere": _sphere,
    "ellipsoid": _ellipsoid,
    "cube": _tri_mesh(_CUBE_V, _CUBE_F),
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "square": _tri_mesh(_SQUARE_V, _SQUARE_F),
    "tetrahedron": _tri_mesh(_TETRA_V, _TETRA_F),
    "octahedron": _tri_mesh(_OCTA_V, _OCTA_F),
    "pyramid": _tri_mesh(_PYR_V, _PYR_F),
}


def _rotations(rng: np.random.Generator, m: int) -> np.ndarray:
    """m rotation matrices [m, 3, 3], uniform over SO(3) (normalised Gaussian quaternions)."""
    q = rng.standard_normal((m, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def make_shapes(n: int, num_points: int, rng: np.random.Generator, noise: float = 0.02,
                scale: Tuple[float, float] = (0.75, 1.25)) -> Tuple[np.ndarray, np.ndarray]:
    """n clouds, classes balanced and shuffled: (x [n, num_points, 3] float32 on the unit
    sphere, y [n] int64 indexing ``SHAPES``). Each cloud: surface samples, anisotropic scale
    per axis in ``scale``, a uniform random rotation, Gaussian noise of std ``noise`` (in units
    of the shape's ~unit size), then centred and scaled to the unit sphere."""
    k = len(SHAPES)
    y = rng.permutation(np.arange(n) % k)
    x = np.empty((n, num_points, 3))
    for label, sample in enumerate(SHAPES.values()):
        sel = np.flatnonzero(y == label)
        if len(sel):
            x[sel] = sample(rng, len(sel), num_points)
    x = x * rng.uniform(*scale, (n, 1, 3))
    x = np.einsum("nij,npj->npi", _rotations(rng, n), x)
    x = x + noise * rng.standard_normal(x.shape)
    return unit_sphere(x).astype(np.float32), y.astype(np.int64)


@dataclass
class ShapesConfig(DataConfig):
    name: str = "shapes"
    n_train: int = 2000
    n_test: int = 500
    num_points: int = 256
    noise: float = 0.02  # std of the surface noise, relative to the unit-size primitive
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n_train", "n_test", "num_points"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.noise < 0:
            raise ConfigError(f"data.noise must be >= 0, got {self.noise}")
        if self.calib_size > self.n_train:
            raise ConfigError(
                f"data.calib_size={self.calib_size} is larger than the training split "
                f"(data.n_train={self.n_train}); lower data.calib_size"
            )


@DATASETS.register("shapes")
class Shapes(BaseDataModule):
    """Ten primitive surfaces (sphere, ellipsoid, cube, cylinder, cone, torus, square,
    tetrahedron, octahedron, pyramid), generated from ``data.seed``; nothing cached on disk."""

    Config = ShapesConfig

    def __init__(self, cfg: ShapesConfig) -> None:
        super().__init__(cfg)
        self.transform_desc = "unit sphere"
        self.classes = list(SHAPES)

    def meta(self) -> dict:
        self.num_classes, self.in_chans, self.input_size = len(SHAPES), 3, (self.cfg.num_points, 3)
        return {"num_classes": len(SHAPES), "in_chans": 3, "img_size": None}

    def _load(self) -> Tuple[Dataset, Dataset]:
        self.meta()
        # independent streams: n_test never changes the training clouds, and vice versa
        train_ss, test_ss = np.random.SeedSequence(self.cfg.seed).spawn(2)
        sets = []
        for ss, n in ((train_ss, self.cfg.n_train), (test_ss, self.cfg.n_test)):
            x, y = make_shapes(n, self.cfg.num_points, np.random.default_rng(ss), noise=self.cfg.noise)
            sets.append(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
        return sets[0], sets[1]
