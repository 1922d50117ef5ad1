"""The data layer: every dataset's shapes and dtypes, calibration drawn only from training
samples (seeded and reproducible), fingerprints, one-line ConfigErrors on bad input, and every
conf/data/*.yaml composing into its typed Config. Small data is written to tmp_path."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from packptq.config import ConfigError, typed
from packptq.data import DATASETS, build_datamodule
from packptq.data.points import SHAPES, make_shapes

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def dm(**section):
    return build_datamodule(section)


def raises_one_line(match: str, fn):
    """fn() must raise ConfigError whose single-line message matches ``match``."""
    with pytest.raises(ConfigError, match=match) as exc:
        fn()
    assert "\n" not in str(exc.value)
    return str(exc.value)


# ---------------------------------------------------------------------------------------------
# fixtures writing small data
# ---------------------------------------------------------------------------------------------
def write_npz(path: Path, n: int = 30, shape=(3, 8, 8), **extra) -> Path:
    """x rows carry their own row number (x[i] == i), so a sample reveals which row it was."""
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, *shape)).copy()
    arrays = {"x": x, "y": np.arange(n, dtype=np.int64) % 3}
    arrays.update(extra)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_image_tree(root: Path, classes=("cat", "dog", "fox"), n_train=4, n_val=2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / c / f"{c}_{i}.png")
    return root


def write_h5(path: Path, n: int, points: int = 64, data_shape=None, label_key="label", seed=0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h:
        h["data"] = rng.normal(size=data_shape or (n, points, 3)).astype(np.float32) * 3 + 5
        h[label_key] = rng.integers(0, 40, (n, 1)).astype(np.uint8)


@pytest.fixture
def modelnet_dir(tmp_path):
    write_h5(tmp_path / "ply_data_train0.h5", 6, seed=1)
    write_h5(tmp_path / "ply_data_train1.h5", 5, seed=2)
    write_h5(tmp_path / "ply_data_test0.h5", 4, seed=3)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
YAMLS = sorted(p.stem for p in CONF_DATA.glob("*.yaml"))


def test_every_registered_dataset_has_a_yaml():
    assert set(YAMLS) == set(DATASETS.names())


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_composes_into_its_config(name, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"+data={name}", "+seed=0"]  # data yamls read calib_seed: ${seed}
    if name == "npz":
        overrides.append(f"data.path={write_npz(tmp_path / 'd.npz')}")
    elif name == "imagefolder":
        overrides.append(f"data.path={tmp_path}")
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    monkeypatch.setenv("MODELNET40_DIR", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF_DATA.parent), version_base="1.3"):
        cfg = compose(overrides=overrides)
    cls = DATASETS.get(name)
    conf = typed(cls.Config, cfg.data, "data")
    assert type(conf) is cls.Config and conf.name == name
    # every setting is visible in the yaml, and the yaml sets nothing the schema lacks
    assert set(OmegaConf.to_container(cfg.data)) == {f.name for f in dataclasses.fields(cls.Config)}
    if name in ("imagenet", "modelnet40"):
        assert conf.path == str(tmp_path)  # the env var reached the config


def test_imagenet_without_path_says_how_to_set_it(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    with initialize_config_dir(config_dir=str(CONF_DATA.parent), version_base="1.3"):
        cfg = compose(overrides=["+data=imagenet", "+seed=0"])
    raises_one_line("set IMAGENET_DIR or data.path", lambda: build_datamodule(cfg.data))


def test_unknown_key_and_unknown_dataset():
    raises_one_line("bad 'data' config", lambda: dm(name="shapes", n_trian=10))
    with pytest.raises(KeyError, match="known: .*shapes"):
        dm(name="nope")


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------
def rows(x: torch.Tensor) -> list:
    """Row numbers of write_npz samples."""
    return [int(v) for v in x[:, 0, 0, 0]]


def test_npz_seeded_split_shapes_and_calibration_from_train(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=30)
    d = dm(name="npz", path=str(path), n_test=10, calib_size=8, batch_size=4)
    assert d.meta() == {"num_classes": 3, "in_chans": 3, "img_size": 8}
    assert d.input_size == (3, 8, 8)
    d.setup()
    assert (len(d.train_set), len(d.test_set)) == (20, 10)
    x, y = d.calib_tensors()
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    train_rows = set(rows(d.train_set.tensors[0]))
    test_rows = set(rows(d.test_set.tensors[0]))
    assert not train_rows & test_rows and len(train_rows | test_rows) == 30
    assert set(rows(x)) <= train_rows and len(set(rows(x))) == 8
    # nothing is applied to x, and labels follow their rows
    assert torch.equal(y, torch.tensor(rows(x)) % 3)
    xb, yb = next(iter(d.test_dataloader()))
    assert xb.shape == (4, 3, 8, 8)


def test_npz_explicit_split_and_calib_array(tmp_path):
    train, test = np.arange(0, 24), np.arange(24, 30)
    calib = np.array([1, 3, 5, 7, 9, 11, 13])
    path = write_npz(tmp_path / "d.npz", n=30, train=train, test=test, calib=calib)

    def calib_rows(seed, size=4):
        d = dm(name="npz", path=str(path), calib_size=size, seed=seed)
        return rows(d.calib_tensors()[0]), d

    a, d = calib_rows(0)
    assert set(a) <= set(calib.tolist()) and len(set(a)) == 4
    assert rows(d.test_set.tensors[0]) == test.tolist()
    assert calib_rows(0)[0] == a  # reproducible
    assert any(calib_rows(s)[0] != a for s in (1, 2, 3))  # the seed matters
    raises_one_line(r"larger than the npz calib array \(7 samples\)", lambda: dm(name="npz", path=str(path), calib_size=8).meta())


def test_npz_only_train_given_test_is_the_rest(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=30, train=np.arange(5, 30))
    d = dm(name="npz", path=str(path), calib_size=4)
    d.setup()
    assert rows(d.test_set.tensors[0]) == [0, 1, 2, 3, 4]


def test_npz_num_classes_key(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    assert dm(name="npz", path=str(path), n_test=5, calib_size=4, num_classes=10).meta()["num_classes"] == 10
    raises_one_line("label 2 but data.num_classes=2", lambda: dm(name="npz", path=str(path), n_test=5, num_classes=2).meta())


NPZ_BAD = {
    "x float64": (dict(x=np.zeros((30, 3, 8, 8))), "x must be float32"),
    "x 3-D": (dict(x=np.zeros((30, 8, 8), np.float32)), r"x must be float32 \[N, C, H, W\]"),
    "y 2-D": (dict(y=np.zeros((30, 1), np.int64)), "y must be 1-D integer"),
    "y float": (dict(y=np.zeros(30, np.float32)), "y must be 1-D integer"),
    "lengths differ": (dict(y=np.zeros(29, np.int64)), "x has 30 samples but y has 29"),
    "y missing": (dict(y=None), r"lacks array\(s\) \['y'\]"),
    "negative label": (dict(y=np.full(30, -1)), "negative labels"),
    "index out of range": (dict(train=np.arange(0, 31)), r"'train' has indices outside \[0, 30\)"),
    "index not int": (dict(test=np.zeros(3, np.float32)), "'test' must be 1-D integer"),
    "repeated index": (dict(train=np.array([0, 0, 1])), "'train' repeats"),
    "calib outside train": (dict(train=np.arange(20), test=np.arange(20, 30), calib=np.array([1, 25])),
                            "calib has 1 rows outside the train split"),
    "train/test overlap": (dict(train=np.arange(20), test=np.arange(15, 30)), "share 5 rows"),
}


@pytest.mark.parametrize("case", list(NPZ_BAD))
def test_npz_bad_input_fails_in_meta(case, tmp_path):
    arrays, msg = NPZ_BAD[case]
    path = write_npz(tmp_path / "d.npz", **arrays)
    raises_one_line(msg, lambda: dm(name="npz", path=str(path), n_test=5, calib_size=4).meta())


def test_npz_bad_paths_and_sizes(tmp_path):
    raises_one_line("data.path is required for dataset 'npz'", lambda: dm(name="npz"))
    raises_one_line("does not exist", lambda: dm(name="npz", path=str(tmp_path / "missing.npz")))
    raises_one_line("needs a file", lambda: dm(name="npz", path=str(tmp_path)))
    (tmp_path / "bad.npz").write_text("not a zip")
    raises_one_line("not an .npz archive", lambda: dm(name="npz", path=str(tmp_path / "bad.npz")).meta())
    path = write_npz(tmp_path / "d.npz", n=30)
    raises_one_line("n_test=30 leaves no training samples", lambda: dm(name="npz", path=str(path), n_test=30).meta())
    raises_one_line(r"calib_size=21 is larger than the training split \(20",
                    lambda: dm(name="npz", path=str(path), n_test=10, calib_size=21).meta())
    nan = np.zeros((30, 1, 2, 2), np.float32)
    nan[3] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan, y=np.zeros(30, np.int64))
    raises_one_line("NaN or inf", lambda: dm(name="npz", path=str(tmp_path / "nan.npz"), n_test=5, calib_size=4).setup())


def test_fingerprint_tracks_calibration_not_runtime(tmp_path):
    path = str(write_npz(tmp_path / "d.npz", n=30))
    base = dict(name="npz", path=path, n_test=10, calib_size=8)
    fp = dm(**base).fingerprint()
    assert dm(**base).fingerprint() == fp
    assert dm(**base, batch_size=3, num_workers=1).fingerprint() == fp
    assert dm(**{**base, "calib_size": 7}).fingerprint() != fp
    assert dm(**base, seed=1).fingerprint() != fp
    # same config, other data in the file: the calibration samples differ, so must the print
    np.savez(path, x=np.ones((30, 3, 8, 8), np.float32), y=np.arange(30) % 2)
    assert dm(**base).fingerprint() != fp


# ---------------------------------------------------------------------------------------------
# imagefolder / imagenet
# ---------------------------------------------------------------------------------------------
def test_imagefolder_default_then_model_transform(tmp_path):
    import timm

    root = write_image_tree(tmp_path / "imgs")
    d = dm(name="imagefolder", path=str(root), img_size=32, calib_size=5, batch_size=2, num_workers=0)
    assert d.meta() == {"num_classes": 3, "in_chans": 3, "img_size": 32}
    x, y = d.calib_tensors()
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    # calibration images are training images, drawn by the seed
    files = [rel for rel, _ in d.source_desc()]
    assert all(f.startswith("train" + os.sep) for f in files) and len(set(files)) == 5
    assert len(d.train_set) == 12 and len(d.test_set) == 6
    before = d.fingerprint()

    d.attach_model(timm.create_model("resnet18", num_classes=3))  # data.img_size wins over timm's 224
    assert d.input_size == (3, 32, 32)
    x2, y2 = d.calib_tensors()
    assert x2.shape == (5, 3, 32, 32) and torch.equal(y, y2)
    xb, yb = next(iter(d.test_dataloader()))
    assert xb.shape == (2, 3, 32, 32)
    big = dm(name="imagefolder", path=str(root), img_size=40, calib_size=5, batch_size=2, num_workers=0)
    big.attach_model(timm.create_model("resnet18", num_classes=3))
    assert big.calib_tensors()[0].shape == (5, 3, 40, 40)
    assert big.fingerprint() != before  # the transform is part of the fingerprint
    # labels are the sorted class folders: a val image of "fox" is class 2
    assert d.test_set.samples[-1][1] == 2 and "fox" in d.test_set.samples[-1][0]

    other = dm(name="imagefolder", path=str(root), img_size=32, calib_size=5, seed=1)
    assert [r for r, _ in other.source_desc()] != files


def test_imagefolder_keeps_the_images_own_size(tmp_path):
    """data.img_size null: the 20x24 images stay 20x24 through the model's transform (its mean
    and std, no resize, no crop); an image of another size is resized to the first one's."""
    import timm
    from PIL import Image

    root = write_image_tree(tmp_path / "imgs", n_train=2, n_val=1)
    Image.new("RGB", (50, 30)).save(root / "train" / "dog" / "dog_9.png")
    d = dm(name="imagefolder", path=str(root), calib_size=7, batch_size=2, num_workers=0)
    assert d.meta()["img_size"] == (20, 24) and d.input_size == (3, 20, 24)
    model = timm.create_model("resnet18", num_classes=3)
    d.attach_model(model)
    assert d.input_size == (3, 20, 24)
    x, _ = d.calib_tensors()
    assert x.shape == (7, 3, 20, 24)
    # no resampling: the pixels are the file's, normalised by the model's mean and std
    cfg = timm.data.resolve_model_data_config(model)
    px = torch.from_numpy(np.asarray(Image.open(root / "train" / "cat" / "cat_0.png"))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    assert torch.allclose(d.train_set[0][0], (px - mean) / std, atol=1e-5)


def test_imagefolder_vit_uses_its_fixed_input_size(tmp_path):
    import timm

    root = write_image_tree(tmp_path / "imgs", n_train=1, n_val=1)
    d = dm(name="imagefolder", path=str(root), img_size=32, calib_size=2)
    d.attach_model(timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8))
    assert d.input_size == (3, 32, 32) and d.calib_tensors()[0].shape == (2, 3, 32, 32)


def test_imagefolder_bad_trees(tmp_path):
    from PIL import Image

    def make(p):
        return dm(name="imagefolder", path=None if p is None else str(p), calib_size=2)

    raises_one_line("data.path is required for dataset 'imagefolder'", lambda: make(None))
    raises_one_line("does not exist", lambda: make(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_one_line("has no train/ folder", lambda: make(empty).meta())

    flat = tmp_path / "flat"
    for s in ("train", "val"):
        (flat / s).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(flat / s / "a.png")
    raises_one_line("train has no class folders", lambda: make(flat).meta())

    noimg = tmp_path / "noimg"
    for s in ("train", "val"):
        (noimg / s / "cat").mkdir(parents=True)
        (noimg / s / "cat" / "notes.txt").write_text("x")
    raises_one_line("no images", lambda: make(noimg).meta())

    root = write_image_tree(tmp_path / "ok", n_train=2, n_val=1)
    (root / "val" / "wolf").mkdir()
    raises_one_line(r"not in train/: \['wolf'\]", lambda: make(root).meta())
    (root / "val" / "wolf").rmdir()
    raises_one_line(r"calib_size=7 is larger than the training split \(6", lambda: dm(
        name="imagefolder", path=str(root), calib_size=7).setup())
    (root / "train" / "emu").mkdir()
    raises_one_line(r"no images under .*train: \['emu'\]", lambda: make(root).setup())


def test_imagenet_reads_the_env_path(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "inet", n_train=2, n_val=1)
    monkeypatch.setenv("IMAGENET_DIR", str(root))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DATA.parent), version_base="1.3"):
        cfg = compose(overrides=["+data=imagenet", "data.calib_size=3", "+seed=0"])
    d = build_datamodule(cfg.data)
    assert d.cfg.batch_size == 64 and d.meta()["num_classes"] == 3
    assert d.calib_tensors()[0].shape == (3, 3, 224, 224)
    raises_one_line("has no train/ folder",
                    lambda: dm(name="imagenet", path=str(tmp_path)).meta())


# ---------------------------------------------------------------------------------------------
# modelnet40
# ---------------------------------------------------------------------------------------------
def test_modelnet40_reads_hdf5(modelnet_dir):
    import h5py

    d = dm(name="modelnet40", path=str(modelnet_dir), num_points=32, normalize=False, calib_size=4)
    assert d.meta() == {"num_classes": 40, "in_chans": 3, "img_size": None}
    assert d.input_size == (32, 3)
    d.setup()
    assert (len(d.train_set), len(d.test_set)) == (11, 4)
    x, y = d.train_set.tensors
    with h5py.File(modelnet_dir / "ply_data_train1.h5") as h:
        # files concatenate in order, and the first num_points points are kept
        np.testing.assert_array_equal(x[6:].numpy(), h["data"][:, :32])
        np.testing.assert_array_equal(y[6:].numpy(), h["label"][:, 0])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.ndim == 1
    cx, cy = d.calib_tensors()
    assert cx.shape == (4, 32, 3)

    n = dm(name="modelnet40", path=str(modelnet_dir), num_points=32, normalize=True, calib_size=4)
    n.setup()
    xn = n.train_set.tensors[0]
    assert xn.mean(1).abs().max() < 1e-5
    assert torch.allclose(xn.norm(dim=-1).amax(1), torch.ones(11))
    assert n.fingerprint() != d.fingerprint()


def test_modelnet40_bad_input(tmp_path):
    def make(**kw):
        return dm(name="modelnet40", path=str(tmp_path), num_points=32, calib_size=2, **kw)

    raises_one_line("set MODELNET40_DIR or data.path", lambda: dm(name="modelnet40"))
    raises_one_line(r"no ply_data_train\*.h5", lambda: make().meta())
    write_h5(tmp_path / "ply_data_train0.h5", 4)
    raises_one_line(r"no ply_data_test\*.h5", lambda: make().meta())
    write_h5(tmp_path / "ply_data_test0.h5", 4, label_key="labels")
    raises_one_line("has no 'label' dataset", lambda: make().meta())
    write_h5(tmp_path / "ply_data_test0.h5", 4, data_shape=(4, 64, 2))
    raises_one_line(r"'data' must be float \[N, points, 3\]", lambda: make().meta())
    write_h5(tmp_path / "ply_data_test0.h5", 4)
    raises_one_line("stores 64 points per cloud; data.num_points=100", lambda: dm(
        name="modelnet40", path=str(tmp_path), num_points=100, calib_size=2).meta())
    raises_one_line(r"calib_size=5 is larger than the training split \(4", lambda: dm(
        name="modelnet40", path=str(tmp_path), num_points=32, calib_size=5).meta())
    raises_one_line("outside data.num_classes=3", lambda: make(num_classes=3).setup())
    (tmp_path / "ply_data_test0.h5").write_text("not hdf5")
    raises_one_line("cannot open .* as HDF5", lambda: make().meta())


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def test_shapes_is_deterministic_and_balanced():
    assert len(SHAPES) >= 8
    d = dm(name="shapes")  # the default sizes: 2000 + 500 clouds of 256 points
    d.setup()
    x, y = d.train_set.tensors
    assert x.shape == (2000, 256, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [200] * len(SHAPES)
    assert torch.allclose(x.norm(dim=-1).amax(1), torch.ones(2000), atol=1e-5)
    assert d.meta() == {"num_classes": len(SHAPES), "in_chans": 3, "img_size": None}

    small = dict(name="shapes", n_train=50, n_test=20, num_points=32, calib_size=10)
    a, b, c = dm(**small), dm(**small), dm(**small, seed=1)
    for m in (a, b, c):
        m.setup()
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0][:20], a.test_set.tensors[0])


def test_shapes_calibration_and_fingerprint():
    small = dict(name="shapes", n_train=50, n_test=20, num_points=32, calib_size=10)
    d = dm(**small)
    idx = d.calib_indices()
    assert len(set(idx.tolist())) == 10 and int(idx.max()) < 50  # positions in the train split
    x, y = d.calib_tensors()
    assert torch.equal(x, d.train_set.tensors[0][idx]) and x.shape == (10, 32, 3)
    assert torch.equal(dm(**small).calib_indices(), idx)
    assert not torch.equal(dm(**small, seed=1).calib_indices(), idx)
    fp = d.fingerprint()
    assert dm(**small).fingerprint() == fp
    assert dm(**{**small, "calib_size": 11}).fingerprint() != fp
    assert dm(**small, seed=1).fingerprint() != fp
    raises_one_line(r"calib_size=51 is larger than the training split \(data.n_train=50\)",
                    lambda: dm(**{**small, "calib_size": 51}))


def _shape_features(x: np.ndarray) -> np.ndarray:
    # rotation-invariant: covariance eigenvalues and a histogram of distances to the centroid
    c = x - x.mean(1, keepdims=True)
    ev = np.sort(np.linalg.eigvalsh(np.einsum("npi,npj->nij", c, c) / x.shape[1]), axis=1)
    r = np.linalg.norm(c, axis=-1)
    hist = np.stack([np.histogram(ri, bins=10, range=(0, 1))[0] for ri in r]) / x.shape[1]
    return np.concatenate([10 * ev, hist], axis=1)


def test_shapes_classes_are_separable():
    xtr, ytr = make_shapes(400, 128, np.random.default_rng(0))
    xte, yte = make_shapes(200, 128, np.random.default_rng(1))
    ftr, fte = _shape_features(xtr), _shape_features(xte)
    centroids = np.stack([ftr[ytr == k].mean(0) for k in range(len(SHAPES))])
    pred = ((fte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 0.4  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# embedded
# ---------------------------------------------------------------------------------------------
def test_digits_calibration_shapes():
    d = dm(name="digits", n_test=500, calib_size=16)
    assert d.meta() == {"num_classes": 10, "in_chans": 1, "img_size": 16}
    x, y = d.calib_tensors()
    assert x.shape == (16, 1, 16, 16) and y.shape == (16,) and len(d.test_set) == 500


@pytest.mark.parametrize("name,native", [("digits", 16), ("mnist5k", 28)])
def test_embedded_img_size_resizes_every_split(name, native):
    """data.img_size: the same samples, bilinearly resized (e.g. to 32, the side ImageNet CNNs'
    five stride-2 stages need); unset, the data keeps its own side (and the FP cache key of
    configs without the field)."""
    from packptq.fp import fp_cache_key

    own, big = dm(name=name, calib_size=8), dm(name=name, calib_size=8, img_size=32)
    assert own.meta()["img_size"] == native and big.meta() == {"num_classes": 10, "in_chans": 1, "img_size": 32}
    own.setup(), big.setup()
    (xo, yo), (xb, yb) = own.calib_tensors(), big.calib_tensors()
    assert xb.shape == (8, 1, 32, 32) and torch.equal(yo, yb)  # the same images, in the same order
    if name == "mnist5k":  # digits resizes its 8x8 originals straight to the asked side
        want = torch.nn.functional.interpolate(xo, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(xb, want, atol=1e-5)
    assert big.test_set[0][0].shape == (1, 32, 32)
    from packptq.zoo.build import ModelConfig

    model = ModelConfig(name="resnet18")
    assert fp_cache_key(model, own.cfg) != fp_cache_key(model, big.cfg)
    # a config class without the field (as before it existed) keys the same FP model
    fields = [(f.name, f.type, f) for f in dataclasses.fields(own.cfg) if f.name != "img_size"]
    Older = dataclasses.make_dataclass("Older", fields)
    older = Older(**{k: v for k, v in dataclasses.asdict(own.cfg).items() if k != "img_size"})
    assert fp_cache_key(model, older) == fp_cache_key(model, own.cfg)
    raises_one_line("data.img_size must be >= 1", lambda: dm(name=name, img_size=0))


# ---------------------------------------------------------------------------------------------
# the validation split (data.val_size)
# ---------------------------------------------------------------------------------------------
def test_validation_split_is_held_out_of_calibration_and_fixed_over_run_seeds():
    def dm(**kw):
        m = build_datamodule({"name": "digits", "calib_size": 64, **kw})
        m.setup()
        return m

    plain = dm()
    # no validation split: calibration is the same draw as it is for configs without the key
    g = torch.Generator().manual_seed(0)
    assert plain.calib_indices().tolist() == torch.randperm(len(plain.train_set), generator=g)[:64].tolist()
    assert len(plain.val_indices()) == 0
    runs = [dm(val_size=100, calib_seed=s) for s in (0, 1, 2)]
    vals = [set(r.val_indices().tolist()) for r in runs]
    assert all(len(v) == 100 for v in vals) and vals[0] == vals[1] == vals[2]  # the split seed's, not the run's
    for r, v in zip(runs, vals):
        cal = set(r.calib_indices().tolist())
        assert len(cal) == 64 and not cal & v  # never calibrated on
        xs = torch.stack([torch.as_tensor(r.train_set[i][0]) for i in r.val_indices().tolist()])
        assert torch.equal(torch.cat([x for x, _ in r.val_dataloader()]), xs)  # the loader serves exactly them
    assert runs[0].fingerprint() != plain.fingerprint()
    assert set(runs[0].calib_indices().tolist()) != set(runs[1].calib_indices().tolist())
    with pytest.raises(ConfigError, match="val_size"):
        build_datamodule({"name": "digits", "val_size": -1})
    with pytest.raises(ConfigError, match="data.val_size=2000 is larger than the training split"):
        dm(val_size=2000)
