"""Calibration input as users hold it, checked before any work.

``calib_inputs(model, calib_data)`` accepts a tensor ``x``, a pair ``(x, y)``, a
``torch.utils.data.Dataset`` (items ``x`` or ``(x, y, ...)``) or a ``DataLoader`` (batches of
the same forms) and returns ``(x [n, ...] float32, y [n] int64 or None)``. Every fault a user
can make with it is one ``DataError`` line naming the problem and the fix: a model that is not
an ``nn.Module``, a numpy array, no samples, integer pixels, a rank or channel count the model's
first layer cannot take, non-finite values, labels that do not match the inputs, a model that
fails on one of the inputs."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn

from packptq.config import ConfigError

_FORMS = "a tensor x [n, ...], a pair (x, y), a torch Dataset or a DataLoader"


class DataError(ConfigError):
    """Input data (calibration tensors, datasets) that cannot be used as given."""


def check_model(model: Any) -> nn.Module:
    """``model`` itself when it is an ``nn.Module``; else a DataError."""
    if not isinstance(model, nn.Module):
        raise DataError(f"model is of type {type(model).__name__}, not a torch.nn.Module; pass the network itself "
                        "(e.g. the nn.Module your training code builds)")
    if next(model.parameters(), None) is None:
        raise DataError(f"model {type(model).__name__} has no parameters; there is nothing to quantize")
    return model


def _kind(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}" if type(obj).__module__ != "builtins" else type(obj).__name__


def _is_numpy(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "dtype")


def _split_item(item: Any, where: str) -> Tuple[Any, Any]:
    """(x, y) of one dataset item or loader batch: ``x`` or ``(x, y, ...)``."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise DataError(f"{where} is empty; expected x or (x, y)")
        return item[0], item[1] if len(item) > 1 else None
    if isinstance(item, dict):
        raise DataError(f"{where} is a dict (keys {sorted(item)[:4]}); give items x or (x, y), e.g. wrap the "
                        "dataset so __getitem__ returns (image, label)")
    return item, None


def _as_tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if _is_numpy(v):
        raise DataError(f"{what} is a numpy array; pass torch.from_numpy({what.split()[0]}) (float32, "
                        "normalised as the model expects)")
    if isinstance(v, (int, float)) and what.startswith("label"):
        return torch.tensor(v)
    raise DataError(f"{what} is a {_kind(v)}, not a torch.Tensor; calib_data may be {_FORMS}")


def _gather(calib_data: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The inputs and labels held by ``calib_data`` (any accepted form), not yet checked."""
    from torch.utils.data import DataLoader, Dataset

    if _is_numpy(calib_data):
        raise DataError("calib_data is a numpy array; pass torch.from_numpy(x) (float32, normalised as the "
                        "model expects)")
    if isinstance(calib_data, torch.Tensor):
        return calib_data, None
    if isinstance(calib_data, (str, bytes)) or hasattr(calib_data, "__fspath__"):
        raise DataError(f"calib_data is a {type(calib_data).__name__} ({str(calib_data)[:60]!r}); load the images "
                        f"first: it may be {_FORMS}")
    if isinstance(calib_data, (tuple, list)):
        if len(calib_data) != 2:
            raise DataError(f"calib_data is a {type(calib_data).__name__} of {len(calib_data)} items; a pair "
                            "(x, y) has 2 (or pass the tensor x alone)")
        x, y = calib_data
        return _as_tensor(x, "x of calib_data"), None if y is None else _as_tensor(y, "labels y of calib_data")
    if isinstance(calib_data, DataLoader):
        xs, ys = [], []
        for i, batch in enumerate(calib_data):
            x, y = _split_item(batch, f"batch {i} of the DataLoader")
            xs.append(_as_tensor(x, "x of a DataLoader batch"))
            ys.append(None if y is None else _as_tensor(y, "labels of a DataLoader batch").reshape(-1))
        if not xs:
            raise DataError("calib_data is a DataLoader that yields no batch; give it at least one sample "
                            "(drop_last with fewer samples than batch_size yields none)")
        return _cat(xs, "DataLoader batches"), _labels(ys)
    if isinstance(calib_data, Dataset) or (hasattr(calib_data, "__getitem__") and hasattr(calib_data, "__len__")):
        try:
            n = len(calib_data)
        except TypeError:
            raise DataError(f"calib_data is a {_kind(calib_data)} without a length; wrap it in a DataLoader") from None
        if n == 0:
            raise DataError("calib_data is an empty dataset; give at least one sample")
        xs, ys = [], []
        for i in range(n):
            x, y = _split_item(calib_data[i], f"item {i} of the dataset")
            xs.append(_as_tensor(x, "x of a dataset item").unsqueeze(0))
            ys.append(None if y is None else _as_tensor(y, "label of a dataset item").reshape(-1))
        return _cat(xs, "dataset items"), _labels(ys)
    raise DataError(f"calib_data is a {_kind(calib_data)}; it may be {_FORMS}")


def _cat(xs, what: str) -> torch.Tensor:
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"the {what} have different shapes {sorted(shapes)[:3]}; resize them to one size")
    return torch.cat(xs)


def _labels(ys) -> Optional[torch.Tensor]:
    if all(y is None for y in ys):
        return None
    if any(y is None for y in ys):
        raise DataError("some calibration items carry a label and some do not; give all or none")
    return torch.cat(ys)


def _first_layer(model: nn.Module) -> Optional[nn.Module]:
    """The first Conv/Linear registered (usually the first one the forward calls)."""
    return next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)


def _check_shape(model: nn.Module, x: torch.Tensor) -> None:
    layer = _first_layer(model)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        rank = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(layer)]
        form = {3: "[n, C, L]", 4: "[n, C, H, W]", 5: "[n, C, D, H, W]"}[rank]
        if x.dim() == rank - 1 and x.shape[0] == layer.in_channels:
            raise DataError(f"calib_data has shape {list(x.shape)}, one sample without the batch axis; the "
                            f"model's first layer ({type(layer).__name__}) takes {form}: pass x.unsqueeze(0)")
        if x.dim() != rank:
            raise DataError(f"calib_data has shape {list(x.shape)} (rank {x.dim()}); the model's first layer "
                            f"({type(layer).__name__}) takes {form}")
        if x.shape[1] != layer.in_channels:
            hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.dim() == 4 and x.shape[-1] == layer.in_channels \
                else ""
            raise DataError(f"calib_data has {x.shape[1]} channels (shape {list(x.shape)}); the model's first "
                            f"layer takes {layer.in_channels}{hint}")


def calib_inputs(model: Any, calib_data: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x [n, ...] float32, y [n] int64 or None) from ``calib_data`` in any accepted form, with
    ``model`` checked too; a DataError (one line) for every fault, before any heavy work. The
    model is probed on one sample (no_grad, eval mode, restored after)."""
    check_model(model)
    x, y = _gather(calib_data)
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(f"calib_data holds no samples (shape {list(x.shape)}); give at least one")
    if not x.dtype.is_floating_point:
        hint = " (uint8 pixels: x.float() / 255, then normalise as in training)" if x.dtype == torch.uint8 else ""
        raise DataError(f"calib_data has dtype {x.dtype}; the model takes floating-point inputs{hint}")
    x = x.float()
    bad = ~torch.isfinite(x)
    if bad.any():
        where = bad.reshape(len(x), -1).any(1).nonzero()[:, 0]
        raise DataError(f"calib_data has {int(bad.sum())} non-finite values (NaN or inf) in {len(where)} samples, "
                        f"the first at index {int(where[0])}; remove or repair those samples")
    if y is not None:
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise DataError(f"the labels have dtype {y.dtype}; give class indices (integers 0..classes-1)")
        y = y.reshape(-1) if y.dim() != 1 and y.numel() == len(x) else y
        if y.dim() != 1 or len(y) != len(x):
            raise DataError(f"{len(x)} calibration inputs but labels of shape {list(y.shape)}; give one class "
                            "index per input")
        if (y < 0).any():
            raise DataError("the labels hold negative values; give class indices 0..classes-1")
        y = y.long()
    _check_shape(model, x)
    _probe(model, x)
    return x, y


@torch.no_grad()
def _probe(model: nn.Module, x: torch.Tensor) -> None:
    """The model must take one sample: its own error, as one line, otherwise."""
    training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        out = model(x[:1].to(device))
    except Exception as exc:  # the user's forward: any error is theirs to see, as one line
        msg = " ".join(str(exc).split())[:300]
        raise DataError(f"the model fails on a calibration input of shape {list(x[:1].shape)}: "
                        f"{type(exc).__name__}: {msg}") from None
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() < 1:
        raise DataError(f"the model returns a {_kind(out)}, not a tensor of outputs [n, ...]; quantize a "
                        "module whose forward returns the logits")
