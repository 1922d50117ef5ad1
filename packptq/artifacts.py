"""Run-directory artifacts: atomic writes, and the fingerprint guard that refuses to mix a
resumed run with a different config or calibration set."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from packptq.config import ConfigError, RunFailure


#: the key under which every JSON artifact (a dict) records the run that produced it
FP_KEY = "fingerprint"


class RunDir:
    """A run directory. Once ``guard`` has fixed the run's fingerprint, every JSON artifact
    written records it under ``"fingerprint"`` and every one read back must carry the same, so
    artifacts of another run are refused even without ``fingerprint.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.run_fp: Optional[str] = None
        self.written: set = set()  # artifacts this process wrote (a resume that only reads writes no times)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".probe.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run directory {self.path} is not writable ({exc.strerror or exc}); "
                              "give a writable hydra.run.dir=... (or run_dir=...)") from None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write_json(self, name: str, obj: Any) -> Path:
        if self.run_fp is not None and isinstance(obj, dict):
            obj = {**obj, FP_KEY: self.run_fp}
        self.written.add(name)
        return _atomic(self.path / name, lambda p: p.write_text(json.dumps(obj, indent=2, default=_jsonable)))

    def read_raw(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"artifact {self.path / name} is unreadable ({exc}); delete it to recompute") from None

    def read_json(self, name: str) -> Any:
        """The JSON artifact ``name``, checked to come from this run (its fingerprint), without
        the fingerprint entry."""
        obj = self.read_raw(name)
        if self.run_fp is not None and isinstance(obj, dict):
            self.check_origin(name, obj.get(FP_KEY))
            obj = {k: v for k, v in obj.items() if k != FP_KEY}
        return obj

    def check_origin(self, name: str, fingerprint: Optional[str]) -> None:
        if fingerprint != self.run_fp:
            raise ConfigError(f"artifact {self.path / name} was produced by another run (fingerprint {fingerprint}, "
                              f"this run {self.run_fp}); resuming would mix results: use a new run directory "
                              "(hydra.run.dir=...)")

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
        self.written.add(name)
        return save_pt(self.path / name, obj)

    def load_pt(self, name: str) -> Any:
        try:
            return torch.load(self.path / name, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"artifact {self.path / name} is corrupt ({str(exc).splitlines()[0]}); "
                              "delete it to recompute that phase") from None

    def guard(self, config_hash: str, calib_fp: str, items: Optional[dict] = None) -> bool:
        """Record the run's identity (``config_hash``, the calibration fingerprint ``calib_fp``
        and the flat config ``items`` they come from), or check it against the one recorded; a
        refusal names the keys that changed. Every artifact already in the directory must carry
        this run's fingerprint too (so deleting ``fingerprint.json`` cannot mix runs). Returns
        True when resuming an earlier run of the same config. Writes nothing when it refuses."""
        name = "fingerprint.json"
        run_fp = hash_obj({"config": config_hash, "calibration": calib_fp})
        now = {"config": config_hash, "calibration": calib_fp, "run": run_fp, "items": items or {}}
        if self.has(name):
            old = self.read_raw(name)
            if old.get("config") != config_hash or old.get("calibration") != calib_fp:
                raise ConfigError(f"{self.path} holds a run with a different {_changes(old, now)}; resuming would "
                                  "mix results. Use a new run directory (hydra.run.dir=...) or delete the old one")
        for p in sorted(self.path.glob("*.json")):
            if p.name == name:
                continue
            try:
                obj = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # reported when the phase reads it
            if isinstance(obj, dict) and obj.get(FP_KEY) != run_fp:
                raise ConfigError(f"{self.path} holds {p.name} from another run (fingerprint {obj.get(FP_KEY)}, this "
                                  f"run {run_fp}); resuming would mix results. Use a new run directory "
                                  "(hydra.run.dir=...) or delete the old one")
        resumed = self.has(name)
        self.run_fp = run_fp
        if not resumed:
            self.write_json(name, now)
        return resumed


#: run directories this process holds the writer's lock of: resolved path -> [open lock file, depth]
_HELD: dict = {}
LOCK_FILE = ".packptq.lock"


@contextmanager
def writer_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the writer's lock of ``run_dir`` (an exclusive ``flock`` on ``.packptq.lock`` there)
    while the block runs; re-entrant within a process. A directory another process holds is
    refused at once with a ConfigError naming that process (docs/decisions.md: refuse, not
    wait). The kernel drops the lock when its holder exits, even by ``kill -9``."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        Path(key).mkdir(parents=True, exist_ok=True)
        f = open(os.path.join(key, LOCK_FILE), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(f.fileno())
            f.close()
            raise ConfigError(f"run directory {key} is in use by another packptq process{holder}; wait for it "
                              "to finish (then run this command again to resume), or give another hydra.run.dir=...")
        _HELD[key] = [f, 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            f = _HELD.pop(key)[0]
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _lock_holder(fd: int) -> str:
    """`` (pid N)`` of the process holding an flock on the open file ``fd`` (Linux's
    /proc/locks), else ""."""
    ino = os.fstat(fd).st_ino
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(ino):
                return f" (pid {parts[4]})"
    except OSError:
        pass
    return ""


def _changes(old: dict, now: dict) -> str:
    """What differs between two fingerprint records, for a refusal: the config keys that changed
    (with old and new values), else "config" or "calibration set"."""
    a, b = old.get("items") or {}, now.get("items") or {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if keys:
        shown = ", ".join(f"{k} ({a.get(k, '<unset>')} -> {b.get(k, '<unset>')})" for k in keys[:6])
        more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
        return f"config: {shown}{more}"
    if old.get("config") != now.get("config"):
        return "config (FP model or code version)"
    return "calibration set (same config, other samples)"


def flatten(obj: Any, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _atomic(path: Path, write) -> Path:
    """``write(tmp)`` then rename it to ``path``: a reader sees the old file or the new one. The
    temporary file is removed on every error path; a write that fails (a full disk) is a
    RunFailure naming ``path``, the file there before is kept."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        err = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
        if isinstance(err, OSError) and not isinstance(exc, KeyboardInterrupt):
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            raise RunFailure(f"cannot write {path} ({err.strerror or err}); "
                             + ("free space on that disk, then " if full else "")
                             + "run the same command again: the finished phases and units are kept") from None
        raise
    return path


def save_pt(path: Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see ``_atomic``)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file: a full disk raises OSError, not torch's bare message
            torch.save(obj, f)

    return _atomic(Path(path), write)


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


def code_version() -> dict:
    """The packptq code a result was made with: ``{"version": ..., "commit": ...}``, the commit
    being the git HEAD of the package's checkout (``+dirty`` with uncommitted changes to tracked
    files), or None for an installed copy outside git."""
    from packptq.version import __version__

    here = Path(__file__).resolve().parent

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"version": __version__, "commit": commit}
