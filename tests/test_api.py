"""The Python API on a model outside the zoo: ``packptq.quantize`` takes calibration data as
users hold it and refuses every input fault with one line before any work;
``save_quantized`` -> ``load_quantized(path, model=...)`` rebuilds the quantized module onto a
fresh instance of the user's class with identical logits; ``export_onnx`` runs in onnxruntime;
damaged, truncated, text and half-written files, NaN scales and wrong architectures are
refused with one line; a failed save or export leaves no file."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import packptq
from packptq import export
from packptq.inputs import DataError, calib_inputs


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Sequential):
    """A user's own CNN (the generic split rule takes it: blocks 0, 1, 2)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__(block(1, 4, 1), block(4, width, 2), block(width, width, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 3))


OVERRIDES = ["quant=w4a4", "packing=block", "recon.iters=5", "threads=1", "progress=false"]


def one_line(exc_info, match: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and match in msg, msg
    return msg


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(fp_net, qnet, x): Net quantized at W4A4 with block reconstruction."""
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(32, 1, 8, 8)
    qnet, _ = packptq.quantize(net, x, overrides=OVERRIDES, run_dir=str(tmp_path_factory.mktemp("q")))
    return net, qnet, x


# ------------------------------------------------------------------------------ calibration input
class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_calibration_data_in_every_form_gives_the_same_tensors():
    torch.manual_seed(0)
    net, x, y = Net().eval(), torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    for data in (x, (x, y), [x, y], Pairs(x, y), TensorDataset(x, y), DataLoader(Pairs(x, y), batch_size=4),
                 DataLoader(TensorDataset(x), batch_size=3)):
        gx, gy = calib_inputs(net, data)
        assert torch.equal(gx, x) and gx.dtype == torch.float32
        labelled = not isinstance(data, torch.Tensor) and not (isinstance(data, DataLoader)
                                                              and isinstance(data.dataset, TensorDataset))
        assert (gy is not None and torch.equal(gy, y)) if labelled else gy is None


@pytest.mark.parametrize("case,match", [
    ("not_a_module", "not a torch.nn.Module"),
    ("numpy", "numpy array; pass torch.from_numpy"),
    ("numpy_pair", "numpy array; pass torch.from_numpy"),
    ("empty", "no samples"),
    ("empty_dataset", "empty dataset"),
    ("empty_loader", "yields no batch"),
    ("channels", "3 channels"),
    ("channels_last", "channels last? use x.permute(0, 3, 1, 2)"),
    ("rank", "rank 2"),
    ("one_sample_no_batch", "pass x.unsqueeze(0)"),
    ("uint8", "dtype torch.uint8"),
    ("nan_pixel", "1 non-finite values (NaN or inf) in 1 samples, the first at index 5"),
    ("inf_pixel", "non-finite"),
    ("labels_length", "labels of shape [4]"),
    ("float_labels", "class indices"),
    ("triple", "3 items"),
    ("string", "load the images first: it may be a tensor x"),
    ("forward_fails", "the model fails on a calibration input"),
])
def test_each_input_fault_is_one_line_before_any_work(tmp_path, case, match):
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(8, 1, 8, 8)
    model, data = net, x
    if case == "not_a_module":
        model = net.state_dict()
    elif case == "numpy":
        data = x.numpy()
    elif case == "numpy_pair":
        data = (x.numpy(), np.zeros(8, np.int64))
    elif case == "empty":
        data = x[:0]
    elif case == "empty_dataset":
        data = TensorDataset(x[:0])
    elif case == "empty_loader":
        data = DataLoader(TensorDataset(x), batch_size=16, drop_last=True)
    elif case == "channels":
        data = torch.randn(8, 3, 8, 8)
    elif case == "channels_last":
        data = torch.randn(8, 8, 8, 1)
    elif case == "rank":
        data = torch.randn(8, 64)
    elif case == "one_sample_no_batch":
        data = torch.randn(1, 8, 8)
    elif case == "uint8":
        data = (x * 50).clamp(0, 255).to(torch.uint8)
    elif case == "nan_pixel":
        data = x.clone()
        data[5, 0, 3, 3] = float("nan")
    elif case == "inf_pixel":
        data = x.clone()
        data[0, 0, 0, 0] = float("inf")
    elif case == "labels_length":
        data = (x, torch.zeros(4, dtype=torch.long))
    elif case == "float_labels":
        data = (x, torch.zeros(8))
    elif case == "triple":
        data = (x, x, x)
    elif case == "string":
        data = "images/"
    elif case == "forward_fails":
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(10, 3)).eval()  # 4*6*6 != 10
    run_dir = tmp_path / "q"
    with pytest.raises(DataError) as exc:
        packptq.quantize(model, data, overrides=OVERRIDES, run_dir=str(run_dir))
    one_line(exc, match)
    assert not run_dir.exists()  # refused before any phase ran
    assert isinstance(exc.value, packptq.ConfigError)  # the command lines' exit 2 class


# ------------------------------------------------------------------------------ save / load / onnx
def test_save_load_onto_a_fresh_instance_gives_identical_logits(quantized, tmp_path):
    net, qnet, x = quantized
    path = packptq.save_quantized(qnet, tmp_path / "net.pt")
    torch.manual_seed(123)  # another random init: every weight comes from the file
    loaded = packptq.load_quantized(path, model=Net())
    with torch.no_grad():
        ref, out = qnet(x), loaded(x)
    assert torch.equal(out, ref)
    assert not loaded.training
    fp_bytes = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    assert path.stat().st_size < fp_bytes * 4  # small net: pickling overhead dominates; codes are packed
    # the file holds no architecture: without model= it says how to load it
    with pytest.raises(export.ExportError) as exc:
        packptq.load_quantized(path)
    one_line(exc, "model=YourNet(...)")


def test_export_onnx_agrees_in_onnxruntime(quantized, tmp_path):
    pytest.importorskip("onnxruntime")
    _, qnet, x = quantized
    path = packptq.export_onnx(qnet, tmp_path / "net.onnx", x[:1])
    with torch.no_grad():
        ref = qnet(x)
    out = export.onnx_predict(path, x)
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert (out - ref).abs().max() < 1e-3
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]
    # the graph's digest travels in its metadata: 64 flipped bytes of weight codes are caught
    import onnx

    model = onnx.load(str(path))
    codes = max((i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8),
                key=lambda i: len(i.raw_data)).raw_data
    raw = path.read_bytes()
    at = raw.index(codes[:64])
    path.write_bytes(raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 64]) + raw[at + 64:])
    with pytest.raises(export.ExportError) as exc:
        export.onnx_predict(path, x)
    one_line(exc, "is damaged: its graph does not match the digest")


def _saved(quantized, tmp_path):
    return packptq.save_quantized(quantized[1], tmp_path / "net.pt")


def _rewrite(path, change):
    """The checkpoint at ``path`` changed by ``change(ck)`` and written back with a valid digest
    (a file a buggy writer produced, not a damaged one)."""
    ck = torch.load(path, weights_only=True)
    change(ck)
    ck["digest"] = export.digest(ck)
    torch.save(ck, path)


@pytest.mark.parametrize("fault,match", [
    ("flipped_bytes", "is damaged: its content does not match the digest"),
    ("truncated", "cannot be read as a packptq quantized file"),
    ("half_written", "cannot be read as a packptq quantized file"),
    ("text", "cannot be read as a packptq quantized file"),
    ("pickle_of_other_kind", "not a packptq quantized file"),
    ("nan_scale", "holds non-finite values in"),
    ("missing", "not found"),
    ("directory", "is a directory"),
    ("wrong_width", "does not match Net"),
    ("wrong_class", "does not match"),
    ("not_a_module", "pass a fresh instance"),
    ("already_quantized", "already quantized"),
])
def test_each_load_fault_is_one_line(quantized, tmp_path, fault, match):
    path = _saved(quantized, tmp_path)
    model = Net()
    raw = path.read_bytes()
    if fault == "flipped_bytes":  # 256 bytes inside the largest tensor record (the packed codes)
        ck = torch.load(path, weights_only=True)
        codes = max((r["codes"] for r in ck["layers"].values()), key=len)
        needle = codes.numpy().tobytes()[:64]
        at = raw.index(needle)
        path.write_bytes(raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 256]) + raw[at + 256:])
    elif fault == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif fault == "half_written":
        path.write_bytes(raw[:-100])
    elif fault == "text":
        path.write_text("this is not a checkpoint\n")
    elif fault == "pickle_of_other_kind":
        torch.save({"state_dict": {}}, path)
    elif fault == "nan_scale":
        def nan(ck):
            k = next(k for k in ck["state"] if k.endswith("wq.scale"))
            ck["state"][k][0] = float("nan")
        _rewrite(path, nan)
    elif fault == "missing":
        path = tmp_path / "nowhere.pt"
    elif fault == "directory":
        path = tmp_path
    elif fault == "wrong_width":
        model = Net(width=16)
    elif fault == "wrong_class":
        model = nn.Sequential(block(1, 4, 1), nn.Flatten(), nn.Linear(256, 3))
    elif fault == "not_a_module":
        model = {"weights": 1}
    elif fault == "already_quantized":
        model = quantized[1]
    with pytest.raises(export.ExportError) as exc:
        packptq.load_quantized(path, model=model)
    msg = one_line(exc, match)
    assert "weights_only" not in msg and "Traceback" not in msg


@pytest.mark.parametrize("fault,match", [
    ("out_is_directory", "is a directory"),
    ("parent_is_a_file", "is a file, not a folder"),
    ("fp_model", "has no quantized layer"),
    ("not_a_module", "not a quantized torch module"),
    ("nan_scale", "non-finite values"),
])
def test_each_save_fault_is_one_line_and_leaves_nothing(quantized, tmp_path, fault, match):
    import copy

    qnet, out = quantized[1], tmp_path / "out" / "net.pt"
    out.parent.mkdir()
    if fault == "out_is_directory":
        out.mkdir()
    elif fault == "parent_is_a_file":
        (tmp_path / "out" / "f").write_text("x")
        out = tmp_path / "out" / "f" / "net.pt"
    elif fault == "fp_model":
        qnet = quantized[0]
    elif fault == "not_a_module":
        qnet = qnet.state_dict()
    elif fault == "nan_scale":
        qnet = copy.deepcopy(qnet)
        next(m for m in qnet.modules() if isinstance(m, export.WeightQuantizer)).scale[0] = float("nan")
    onnx_out = out if fault == "out_is_directory" else out.with_suffix(".onnx")
    for save in (lambda: packptq.save_quantized(qnet, out),
                 lambda: packptq.export_onnx(qnet, onnx_out, quantized[2][:1])):
        with pytest.raises(export.ExportError) as exc:
            save()
        one_line(exc, match)
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "f"]
    assert leftovers == []


@pytest.mark.parametrize("example,match", [(np.zeros((1, 1, 8, 8), np.float32), "numpy"),
                                           (torch.zeros(0, 1, 8, 8), "non-empty"),
                                           (torch.zeros(1, 3, 8, 8), "cannot export Net")])
def test_export_onnx_bad_example_input_is_one_line(quantized, tmp_path, example, match):
    pytest.importorskip("onnx")
    with pytest.raises(export.ExportError) as exc:
        packptq.export_onnx(quantized[1], tmp_path / "m.onnx", example)
    one_line(exc, match.replace("numpy", "ndarray"))
    assert list(tmp_path.iterdir()) == []


def test_unpickling_error_is_not_what_the_user_sees(quantized, tmp_path):
    """torch.load's advice (``weights_only=False``) would run arbitrary code: never offered."""
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": export.FORMAT, "x": object()}))
    with pytest.raises(export.ExportError) as exc:
        packptq.load_quantized(path, model=Net())
    assert "weights_only" not in one_line(exc, "cannot be read")


@pytest.mark.slow
def test_the_example_prints_what_the_readme_shows(capsys):
    """examples/quantize_custom.py reproduces, line for line, the output README.md shows."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("It prints (the test suite runs it and checks these lines", 1)[1]
    shown = block.split("```", 2)[1].strip().splitlines()
    assert len(shown) == 5
    runpy.run_path(str(root / "examples" / "quantize_custom.py"), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    for line in shown:
        assert line in printed, (line, [p for p in printed if not p.startswith(("[packptq]", "  "))])
