"""Run-directory artifacts: atomic writes, and the fingerprint guard that refuses to mix a
resumed run with a different config or calibration set."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from packptq.config import ConfigError


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write_json(self, name: str, obj: Any) -> Path:
        return _atomic(self.path / name, lambda p: p.write_text(json.dumps(obj, indent=2, default=_jsonable)))

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"artifact {self.path / name} is unreadable ({exc}); delete it to recompute") from None

    def cached_json(self, name: str, compute: Callable[[], Any]) -> Any:
        """The artifact ``name`` if the run directory has it (resume), else ``compute()``,
        written there first."""
        if self.has(name):
            return self.read_json(name)
        obj = compute()
        self.write_json(name, obj)
        return obj

    def record(self, name: str, obj: Any) -> Any:
        """Write the JSON artifact ``name``; on resume, check that the one there holds the same
        (a result derived from artifacts that were read back must reproduce them), else raise a
        ConfigError: the run directory mixes two runs."""
        old = self.cached_json(name, lambda: obj)
        if old != json.loads(json.dumps(obj, default=_jsonable)):
            raise ConfigError(f"{self.path / name} differs from what this run derives; the run directory "
                              "mixes two runs: use a new one (hydra.run.dir=...)")
        return obj

    def save_pt(self, name: str, obj: Any) -> Path:
        return _atomic(self.path / name, lambda p: torch.save(obj, p))

    def load_pt(self, name: str) -> Any:
        try:
            return torch.load(self.path / name, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"artifact {self.path / name} is corrupt ({str(exc).splitlines()[0]}); "
                              "delete it to recompute that phase") from None

    def guard(self, config_hash: str, calib_fp: str) -> bool:
        """Record the run's identity, or check it against the one recorded. Returns True when
        resuming an earlier run of the same config."""
        name = "fingerprint.json"
        now = {"config": config_hash, "calibration": calib_fp}
        if self.has(name):
            old = self.read_json(name)
            if old != now:
                what = "config" if old.get("config") != config_hash else "calibration set"
                raise ConfigError(
                    f"{self.path} holds a run with a different {what}; resuming would mix results. "
                    "Use a new run directory (hydra.run.dir=...) or delete the old one")
            return True
        self.write_json(name, now)
        return False


def _atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def hash_obj(obj: Any, drop: Optional[tuple] = None) -> str:
    if isinstance(obj, dict) and drop:
        obj = {k: v for k, v in obj.items() if k not in drop}
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable).encode()).hexdigest()[:16]
