"""Model zoo: block discovery for every family (small inputs, random weights), the generic
rule, PointNet, and the model configs. No network: nothing here uses pretrained weights."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from packptq.config import ConfigError, typed
from packptq.schemas import register
from packptq.zoo import SPLIT_RULES, SplitError, check_split, split_model
from packptq.zoo.build import BUILDERS, ModelConfig, build_model
from packptq.zoo.pointnet import PointNet

CONF = Path(__file__).resolve().parents[1] / "packptq" / "conf"
MODEL_YAMLS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def model_cfg(stem: str, kwargs=None, **override) -> ModelConfig:
    """conf/model/<stem>.yaml composed by Hydra and typed, with ``override`` applied (and
    ``kwargs`` set after typing: see test_model_kwargs_pass_typed)."""
    register()  # model/base, the schema the choice files extend
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=[f"+model={stem}"])
    cfg = typed(ModelConfig, OmegaConf.merge(cfg.model, override), "model")
    return cfg if kwargs is None else dataclasses.replace(cfg, kwargs=dict(kwargs))


def check_blocks(model: nn.Module, split, x: torch.Tensor) -> None:
    """The split composes to the forward; names are unique, resolve and carry parameters."""
    check_split(model, split, x)
    names = split.block_names
    assert names and len(set(names)) == len(names)
    for n, b in split.blocks:
        assert model.get_submodule(n) is b
        assert any(True for _ in b.parameters()), f"block {n} has no parameters"
    for n, _ in split.prefix.submodules() + split.suffix.submodules():
        assert not any(n == b or n.startswith(b + ".") for b in names), f"{n} is both outside and in a block"


# (conf/model file, img_size, patch_size, timm kwargs, block count). Inputs are small; the
# transformers get a small patch (and Swin a small window) so their token grids stay tiny;
# the base ViTs (same class as the small ones) are cut to 4 blocks to build fast.
FAMILIES = [
    ("resnet18", 64, None, {}, 8),
    ("resnet50", 64, None, {}, 16),
    ("mobilenetv2_100", 64, None, {}, 17),
    ("mnasnet_100", 64, None, {}, 17),
    ("regnetx_006", 64, None, {}, 16),
    ("regnetx_032", 64, None, {}, 25),
    ("vit_small_patch16_224", 32, 8, {}, 12),
    ("vit_base_patch16_224", 32, 8, {"depth": 4}, 4),
    ("deit_tiny_patch16_224", 32, 8, {}, 12),
    ("deit_small_patch16_224", 32, 8, {}, 12),
    ("deit_base_patch16_224", 32, 8, {"depth": 4}, 4),
    ("swin_tiny_patch4_window7_224", 64, None, {"window_size": 2}, 12 + 3),  # + 3 patch mergings
    ("swin_small_patch4_window7_224", 64, None, {"window_size": 2}, 24 + 3),
]
# one model per CNN family and Swin (the transformers' _pos_embed is not a module: generic refuses)
GENERIC_CROSS_CHECK = {"resnet18", "mobilenetv2_100", "mnasnet_100", "regnetx_006", "swin_tiny_patch4_window7_224"}


@pytest.mark.parametrize("name,img,patch,kwargs,n_blocks", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_split(name, img, patch, kwargs, n_blocks):
    cfg = model_cfg(name, pretrained=False, img_size=img, patch_size=patch, kwargs=kwargs)
    model = build_model(cfg, {"num_classes": 10, "in_chans": 3, "img_size": img})
    x = torch.randn(2, 3, img, img)
    assert model(x).shape == (2, 10)

    split = split_model(model, cfg.family, example_input=x)
    assert split.family == cfg.family
    assert len(split.blocks) == n_blocks
    check_blocks(model, split, x)
    assert split_model(model).block_names == split.block_names  # auto picks the same rule

    if cfg.family == "swin":
        names = split.block_names
        for i in (1, 2, 3):  # timm >= 0.9: the merging starts stage i, before its blocks
            assert names.index(f"layers.{i}.downsample") == names.index(f"layers.{i}.blocks.0") - 1
        assert "layers.0.downsample" not in names  # Identity in stage 0
    if name in GENERIC_CROSS_CHECK:  # the generic rule finds the same blocks on its own
        assert split_model(model, "generic", example_input=x).block_names == split.block_names


@pytest.mark.parametrize("name,n_blocks,first", [
    ("efficientnet_b0", 16, "blocks.0.0"),
    ("convnext_atto", 12 + 3, "stages.0.blocks.0"),  # + 3 stage downsamples as blocks
    ("resnet26d", 8, "layer1.0"),
])
def test_generic_rule(name, n_blocks, first):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    split = split_model(model, "generic", example_input=x)
    assert len(split.blocks) == n_blocks and split.block_names[0] == first
    check_blocks(model, split, x)
    if name == "convnext_atto":
        assert "stages.1.downsample" in split.block_names
    auto = split_model(model)  # a named rule where one applies, else the graph rule: the same blocks
    assert auto.family == ("resnet" if name == "resnet26d" else "graph")
    assert auto.block_names == split.block_names


def test_generic_layout_survives_copy_and_layer_swaps():
    """Pipeline use: the quantized copy (leaves wrapped) splits like the FP model."""
    model = timm.create_model("convnext_atto", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    names = split_model(model, "generic", example_input=x).block_names

    class Wrap(nn.Module):  # stands in for a quantized layer: the original becomes a child
        def __init__(self, layer):
            super().__init__()
            self.layer, self.scale = layer, nn.Parameter(torch.ones(()))

        def forward(self, h):
            return self.layer(h) * self.scale

    q = copy.deepcopy(model)
    for n, m in list(q.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parent, _, child = n.rpartition(".")
            setattr(q.get_submodule(parent) if parent else q, child, Wrap(m))
    split = split_model(q, "generic")
    assert split.block_names == names
    check_split(q, split, x)


class Blk(nn.Module):
    def __init__(self, zero_init: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        if zero_init:  # the residual branch is zero at initialisation, as timm does for some models
            nn.init.zeros_(self.b.weight)
            nn.init.zeros_(self.b.bias)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class FlipStage(nn.Module):
    """Loops over its blocks between two flips: not a sequential run of its children, but looks
    like one while the blocks are the identity."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Blk(zero_init=True), Blk(zero_init=True))

    def forward(self, x):
        x = x.flip(-1)
        for b in self.blocks:
            x = b(x)
        return x.flip(-1)


class Looped(nn.Module):
    def __init__(self, stage=Blk):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.blocks = nn.ModuleList([stage() for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_generic_rule_custom_models():
    x = torch.randn(2, 4)
    split = split_model(Looped(), "generic", example_input=x)
    assert (split.family, split.prefix.names, split.block_names, split.suffix.names) == \
        ("generic", ["stem"], ["blocks.0", "blocks.1", "blocks.2"], ["head"])
    assert split_model(Looped(), example_input=x).block_names == split.block_names  # auto: the graph rule
    # stages that only look sequential at initialisation stay whole
    model = Looped(FlipStage)
    split = split_model(model, "generic", example_input=x)
    assert split.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    check_split(model, split, x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc((x + self.conv(x)).mean((2, 3)))


def test_generic_rule_fails_clearly():
    with pytest.raises(SplitError, match=r"Residual\.forward is not the sequential run of its children"):
        split_model(Residual(), "generic")
    with pytest.raises(SplitError, match="no repeated blocks"):
        split_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), example_input=torch.randn(2, 8))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    with pytest.raises(SplitError, match=r"blocks \(2 x Block\)"):  # names what it found
        split_model(vit, "generic", example_input=torch.randn(1, 3, 32, 32))


def test_split_model_errors():
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(SplitError, match="does not accept"):
        split_model(model, "swin")
    with pytest.raises(KeyError, match="known: generic, graph, mnasnet"):
        split_model(model, "nope")
    with pytest.raises(SplitError, match="tried"):
        split_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), example_input=torch.randn(2, 8))


def test_quickstart_models_on_mnist_shape():
    """The embedded defaults (28x28 digits, 1 channel) build offline and split."""
    meta = {"num_classes": 10, "in_chans": 1, "img_size": 28}
    x = torch.randn(2, 1, 28, 28)
    for name, n_blocks in (("resnet18", 8), ("deit_tiny_patch16_224", 12)):
        cfg = model_cfg(name)
        assert cfg.pretrained is False
        model = build_model(cfg, meta)
        split = split_model(model, cfg.family, example_input=x)
        assert len(split.blocks) == n_blocks
    assert model.patch_embed.grid_size == (4, 4)  # deit_tiny with patch 7


def test_pointnet():
    assert "pointnet" in BUILDERS and "pointnet" in SPLIT_RULES
    meta = {"num_classes": 10, "in_chans": 3, "img_size": None}
    model = build_model(ModelConfig(name="pointnet", kwargs={"width": 128}), meta)
    assert isinstance(model, PointNet) and model.encoder[-1].conv.out_channels == 128
    x = torch.randn(4, 64, 3)  # [B, N, 3] point-major
    y = model(x)
    assert y.shape == (4, 10)
    torch.testing.assert_close(model(x[:, torch.randperm(64)]), y)  # symmetric in the points

    split = split_model(model, example_input=x)
    assert split.family == "pointnet"
    assert split.block_names == ["encoder.1", "encoder.2", "encoder.3", "encoder.4", "head.0", "head.1"]
    assert split.prefix.names == ["encoder.0"] and split.suffix.names == ["fc"]
    check_blocks(model, split, x)
    assert split.prefix(x).shape == (4, 64, 64)  # [B, C, N]
    assert split.blocks[3][1](torch.randn(4, 128, 64)).shape == (4, 128)  # the max-pool ends encoder.4

    with pytest.raises(ConfigError, match="no pretrained PointNet"):
        build_model(ModelConfig(name="pointnet", pretrained=True), meta)
    with pytest.raises(ConfigError, match="not PointNet arguments"):
        build_model(ModelConfig(name="pointnet", kwargs={"depth": 3}), meta)


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_model_configs_compose(name):
    override = {"name": "convnext_atto"} if name == "timm" else {}
    cfg = model_cfg(name, **override)
    assert cfg.family == "auto" or cfg.family in SPLIT_RULES
    if name not in ("timm", "pointnet"):
        assert cfg.name == name and timm.is_model(name)
    embedded = {"resnet18", "deit_tiny_patch16_224", "pointnet"}  # trained by packptq offline
    assert cfg.pretrained is (name not in embedded)


def test_every_listed_model_has_a_config():
    want = {f[0] for f in FAMILIES} | {"timm", "pointnet"}
    assert want <= set(MODEL_YAMLS)


def test_model_kwargs_pass_typed():
    assert typed(ModelConfig, {"name": "resnet18", "kwargs": {"drop_path_rate": 0.1}}, "model").kwargs == {"drop_path_rate": 0.1}


def test_timm_config_needs_a_name():
    with pytest.raises(ConfigError):
        model_cfg("timm")


def test_checkpoint_shapes_win_over_config_defaults(tmp_path):
    """A checkpoint trained with another patch size / class count loads under the zoo config: the
    model is rebuilt with the checkpoint's shapes and reproduces the saved model's outputs."""
    src = timm.create_model("deit_tiny_patch16_224", num_classes=12, in_chans=1, img_size=16, patch_size=4).eval()
    path = tmp_path / "deit.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DataParallel keys
    meta = {"num_classes": 10, "in_chans": 1, "img_size": 16}
    cfg = model_cfg("deit_tiny_patch16_224", checkpoint=str(path))
    assert cfg.patch_size == 7  # the embedded default, which the checkpoint overrides
    model = build_model(cfg, meta)
    assert model.patch_embed.patch_size == (4, 4) and meta["num_classes"] == 12
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(model(x), src(x))

    with pytest.raises(ConfigError, match="built for 16x16 inputs"):
        build_model(cfg, {"num_classes": 10, "in_chans": 1, "img_size": 28})
    with pytest.raises(ConfigError, match="12-class head but the data has labels up to 19"):
        build_model(cfg, {"num_classes": 20, "in_chans": 1, "img_size": 16})


def test_checkpoint_that_cannot_fit_says_why(tmp_path):
    """An RGB resnet18 checkpoint on 1-channel data: one ConfigError naming the mismatched tensor."""
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in
                               timm.create_model("resnet18", num_classes=10, in_chans=3).state_dict().items()}}, path)
    ok = build_model(model_cfg("resnet18", checkpoint=str(path)), {"num_classes": 10, "in_chans": 3, "img_size": 32})
    assert ok.conv1.weight.shape[1] == 3
    with pytest.raises(ConfigError, match=r"conv1.weight model \(64, 1, 7, 7\) vs checkpoint \(64, 3, 7, 7\)"):
        build_model(model_cfg("resnet18", checkpoint=str(path)), {"num_classes": 10, "in_chans": 1, "img_size": 32})
    torch.save({"epoch": 3}, path)
    with pytest.raises(ConfigError, match="holds no tensors"):
        build_model(model_cfg("resnet18", checkpoint=str(path)), {"num_classes": 10, "in_chans": 3, "img_size": 32})


def test_pretrained_without_the_hub_is_one_config_error(tmp_path, monkeypatch):
    """Offline with an empty hub cache, ``model.pretrained=true`` stops with what to do instead."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="could not get mobilenetv2_100's pretrained weights.*model.checkpoint=PATH"):
        build_model(model_cfg("mobilenetv2_100"), {"num_classes": 10, "in_chans": 3, "img_size": 32})
