"""Block discovery from the dataflow graph (the ``graph`` split rule) on small models built for
each construct, and quantization / reconstruction of the blocks it finds (leaf blocks, blocks
whose layers sit under different modules, functional code between layers)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from packptq.quant import QuantConfig, quantize_model
from packptq.twins import layer_groups
from packptq.zoo import SplitError, check_split, split_model
from packptq.zoo.graph import GraphBlock


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Res(nn.Module):
    """x + f(x) with the add written in forward."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.b(F.relu(self.a(x))))


class PoolInForward(nn.Module):
    """Pooling, flatten and an activation written in forward, between body and head."""

    def __init__(self, body=None):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.body = body if body is not None else nn.Sequential(Res(8), Res(8), Res(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.body(self.stem(x))
        x = F.adaptive_avg_pool2d(F.relu(x), 1)
        return self.head(torch.flatten(x, 1))


def split_of(model, x, family="graph"):
    model.eval()
    s = split_model(model, family, example_input=x)
    assert check_split(model, s, x) <= 1e-5
    return s


def test_residual_blocks_with_pooling_in_forward():
    x = torch.randn(2, 3, 16, 16)
    s = split_of(PoolInForward(), x)
    assert s.block_names == ["body.0", "body.1", "body.2"]
    assert s.prefix.names == ["stem.0", "stem.1", "stem.2"] and s.suffix.names == ["head"]
    m = PoolInForward().eval()
    assert all(b is m.get_submodule(n) for n, b in split_of(m, x).blocks)  # module blocks are the modules
    assert split_model(m).block_names == s.block_names  # auto: no family rule, the graph rule


class FunctionalResidual(nn.Module):
    """Residual blocks written in forward over separate layers: no module holds a block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.a2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b1(F.relu(self.a1(x))))
        x = x + self.b2(torch.relu(self.a2(x)))
        return self.fc(x.mean((2, 3)))


def test_functional_residual_blocks_over_separate_layers():
    x = torch.randn(2, 3, 12, 12)
    s = split_of(FunctionalResidual(), x)
    assert len(s.blocks) == 2 and all(isinstance(b, GraphBlock) for _, b in s.blocks)
    assert [b.names for _, b in s.blocks] == [["a1", "b1"], ["a2", "b2"]]
    assert s.prefix.names == ["stem"] and s.suffix.names == ["fc"]


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Shuffle(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(c // 2, c // 2, 1), conv_bn(c // 2, c // 2, 3, groups=c // 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((a, self.branch(b)), 1), 2)


class Fire(nn.Module):
    def __init__(self, cin, s, e):
        super().__init__()
        self.squeeze, self.e1, self.e3 = nn.Conv2d(cin, s, 1), nn.Conv2d(s, e, 1), nn.Conv2d(s, e, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(x)), F.relu(self.e3(x))], 1)


class Inception(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b1 = nn.Conv2d(cin, c, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.Conv2d(c, c, 3, padding=1))
        self.pool = nn.Conv2d(cin, c, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.pool(F.max_pool2d(x, 3, 1, 1))], 1)


class Dense(nn.Module):
    """A dense block: every layer sees the concatenation of all earlier outputs."""

    def __init__(self, c, g, n=3):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(c + i * g, g, 3, padding=1) for i in range(n)])

    def forward(self, x):
        feats = [x]
        for lay in self.layers:
            feats.append(F.relu(lay(torch.cat(feats, 1))))
        return torch.cat(feats, 1)


@pytest.mark.parametrize("kind", ["shuffle", "fire", "inception", "dense"])
def test_concatenation_units(kind):
    if kind == "shuffle":
        body, cout = nn.Sequential(Shuffle(8), Shuffle(8), Shuffle(8)), 8
    elif kind == "fire":
        body, cout = nn.Sequential(Fire(8, 4, 4), Fire(8, 4, 4), nn.MaxPool2d(2), Fire(8, 4, 4)), 8
    elif kind == "inception":
        body, cout = nn.Sequential(Inception(8, 4), Inception(12, 4), Inception(12, 4)), 12
    else:
        body, cout = nn.Sequential(Dense(8, 4), conv_bn(20, 8, 1), Dense(8, 4)), 20
    model = PoolInForward(body)
    model.head = nn.Linear(cout, 5)
    x = torch.randn(2, 3, 16, 16)
    s = split_of(model, x)
    want = {"shuffle": ["body.0", "body.1", "body.2"],
            "fire": ["body.0", "body.1+body.2", "body.3"],  # the pooling joins the unit before it
            "inception": ["body.0", "body.1", "body.2"],
            "dense": ["body.0", "body.1", "body.2"]}[kind]  # the transition conv is a block of its own
    assert s.block_names == want
    assert s.prefix.names == ["stem.0", "stem.1", "stem.2"] and s.suffix.names == ["head"]


class TBlock(nn.Module):
    """A pre-norm transformer block with attention written as functions."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyViT(nn.Module):
    def __init__(self, d=16, depth=3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.blocks = nn.ModuleList([TBlock(d) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


def test_transformer_blocks_stay_whole():
    x = torch.randn(2, 3, 16, 16)
    s = split_of(TinyViT(), x)
    # each block holds two residual regions; the class token and position embedding are stem
    assert s.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    assert s.prefix.names == ["patch"] and s.suffix.names == ["norm", "head"]


class LeafBlocks(nn.Module):
    """A bare Conv2d between residual blocks: a block that is a layer itself."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(Res(8), nn.Conv2d(8, 8, 3, stride=2, padding=1), Res(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_plain_chain_takes_a_block_per_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    s = split_of(model, torch.randn(2, 3, 16, 16))
    assert s.prefix.names == ["0", "1"] and s.suffix.names == ["9"]
    assert s.block_names == ["2", "5"]
    assert [b.names for _, b in s.blocks] == [["2", "3", "4"], ["5", "6", "7", "8"]]
    with pytest.raises(SplitError, match="no repeated blocks"):
        split_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "graph", example_input=torch.randn(2, 8))


def quantized_groups(model, x, w=8):
    q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=w, a_bits=w), x)
    qs = split_model(q, "graph")  # the copy carries the layout of the FP model
    return q, qs, layer_groups(q, qs, x)


@pytest.mark.parametrize("model,blocks", [
    (LeafBlocks(), [["body.0.a", "body.0.b"], ["body.1"], ["body.2.a", "body.2.b"]]),
    (FunctionalResidual(), [["a1", "b1"], ["a2", "b2"]]),
])
def test_layers_of_leaf_and_scattered_blocks(model, blocks):
    x = torch.randn(2, 3, 12, 12)
    s = split_of(model.eval(), x)
    q, qs, (pre, per_block, suf) = quantized_groups(model, x)
    assert qs.block_names == s.block_names
    assert per_block == blocks
    assert pre == ["stem"] and suf[-1] in ("head", "fc")
    check_split(q, qs, x)


def test_untraceable_model_is_one_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # control flow on tensor values stops symbolic tracing
                x = -x
            return self.b(self.a(x))

    with pytest.raises(SplitError) as exc:
        split_model(Branchy(), "graph", example_input=torch.randn(2, 4))
    msg = str(exc.value)
    assert "\n" not in msg and "cannot trace Branchy" in msg
    assert "if x.sum() > 0" in msg and "split rule" in msg and "docs/splitting.md" in msg
    with pytest.raises(SplitError) as exc:  # auto: the module-tree rule fails too; still one line
        split_model(Branchy(), example_input=torch.randn(2, 4))
    assert "\n" not in str(exc.value) and "cannot trace Branchy" in str(exc.value)


def test_torchvision_resnet_rule_and_graph_agree():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    rule, graph = split_of(model, x, "resnet"), split_of(model, x, "graph")
    assert rule.block_names == graph.block_names == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert split_model(model).family == "resnet"


@pytest.mark.parametrize("model,packing,blocks", [
    (FunctionalResidual, "block", ["a1+b1", "a2+b2"]),  # blocks over separate layers
    (LeafBlocks, "block", ["body.0", "body.1", "body.2"]),  # a bare Conv2d as a block
    (LeafBlocks, "layer", ["body.0", "body.1", "body.2"]),
    (FunctionalResidual, "hessian", ["a1+b1", "a2+b2"]),  # scores over graph blocks
])
def test_quantize_api_reconstructs_graph_blocks(model, packing, blocks):
    """W4A4 reconstruction through the API on models only the graph rule splits: every block
    (or each of its layers) is a unit, and the reconstructed model is closer to the FP one than
    round-to-nearest with the same quantizers."""
    import packptq

    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(64, 3, 12, 12)
    common = ["quant=w4a4", "recon.batch_size=16", "recon.predict=false"]
    rtn, _ = packptq.quantize(model, x[:48], overrides=common + ["packing=none"])
    q, rep = packptq.quantize(model, x[:48], overrides=common + [f"packing={packing}", "recon.iters=60"])
    assert rep["family"] == "graph" and rep["blocks"] == blocks
    units = [k for k in rep["recon_loss"] if not k.startswith(("prefix", "suffix"))]
    n_layers = {"a1+b1": 2, "a2+b2": 2, "body.0": 2, "body.1": 1, "body.2": 2}
    assert len(units) == (sum(n_layers[b] for b in blocks) if packing == "layer" else len(rep["packs"]))
    with torch.no_grad():
        ref, xt = model(x[48:]), x[48:]
        assert (q(xt) - ref).norm() < (rtn(xt) - ref).norm()


def test_command_line_models_without_a_rule_take_the_graph_rule():
    """`model=timm model.name=...` (and `model.checkpoint=`, the same builder) reach the fp phase's
    split with model.family=auto: a timm model no family rule knows is split by its graph."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from packptq import fp
    from packptq.config import typed
    from packptq.schemas import register
    from packptq.zoo.build import ModelConfig, build_model

    register()
    with initialize_config_dir(config_dir=str(Path(fp.__file__).parent / "conf"), version_base=None):
        cfg = compose(overrides=["+model=timm", "+model.name=ghostnet_100"])
    mcfg = typed(ModelConfig, OmegaConf.merge(cfg.model, {"pretrained": False}), "model")
    model = build_model(mcfg, {"num_classes": 10, "in_chans": 3, "img_size": 32}).eval()
    s = fp.split(model, mcfg, torch.randn(2, 3, 32, 32))
    assert mcfg.family == "auto" and s.family == "graph"
    assert s.block_names[0] == "blocks.0.0" and len(s.blocks) == 16
