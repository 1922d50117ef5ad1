"""What every phase of a run shares: ``RunContext`` (the run directory, the device and trainer
settings, the seed, the forward batch size, the metrics logger, the phase timer and whether
progress bars show). Each phase module has one entry, ``run(ctx, ...)``, that takes it."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from packptq.artifacts import RunDir, flatten, hash_obj
from packptq.runtime import Timer, autocast, check_seed, device_of, log_metrics, log_table, trainer_kwargs

#: the library's one logger; the command line gives it handlers, an API user may silence it
log = logging.getLogger("packptq")

#: config keys that do not change results (excluded from the resume fingerprint). The trainer
#: section is replaced by what of it changes results (precision, the device type); the data's
#: location and loader workers are left out (its content enters through the calibration
#: fingerprint and the FP model's identity).
VOLATILE = ("logger", "trainer", "threads", "progress", "run_dir", "cache_dir", "hydra", "export")
VOLATILE_DATA = ("path", "num_workers")


def fingerprint_items(cfg_dict: dict, trainer_kw: dict, device: torch.device, fp_identity) -> dict:
    """The flat config that identifies a run's results: every key outside VOLATILE, the
    trainer's precision and device type, the FP model's identity."""
    items = {k: v for k, v in cfg_dict.items() if k not in VOLATILE}
    items["data"] = {k: v for k, v in (items.get("data") or {}).items() if k not in VOLATILE_DATA}
    items["trainer"] = {"precision": str(trainer_kw.get("precision", "32-true")), "device": device.type}
    items["_fp_model"] = fp_identity
    return flatten(items)


def add_times(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    """Phase times of two processes on one run directory, summed per phase."""
    return {k: round(a.get(k, 0.0) + b.get(k, 0.0), 3) for k in {**a, **b}}


@dataclass
class RunContext:
    """The settings and services a phase needs besides its own config section.

    ``rd``: the run directory (artifacts); ``trainer_kw``: the validated ``trainer`` section
    (Lightning Trainer arguments) and ``device`` the device it selects; ``seed``: the run seed;
    ``batch_size``: every batched forward over a tensor set; ``logger``: a Lightning logger for
    metrics and tables (None: off); ``progress``: tqdm bars; ``config``: the resolved config of
    a command-line run (None for the Python API), from which ``open`` fingerprints the run."""

    rd: RunDir
    device: torch.device
    trainer_kw: dict
    seed: int
    batch_size: int
    logger: object = None
    progress: bool = False
    config: Optional[dict] = None
    timer: Timer = field(default=None)
    prior_times: Dict[str, float] = field(default_factory=dict)  # earlier processes on this run directory

    def __post_init__(self) -> None:
        if self.timer is None:
            self.timer = Timer(self._persist_times)

    @classmethod
    def create(cls, run_dir, trainer_section, seed, batch_size: int, logger=None, progress: bool = False,
               config: Optional[dict] = None) -> "RunContext":
        """Validate the trainer section and the seed (ConfigError before any compute) and open
        (create) the run directory."""
        kw = trainer_kwargs(trainer_section)
        return cls(RunDir(run_dir), device_of(kw), kw, check_seed(seed), batch_size, logger, progress, config)

    def _persist_times(self, mine: Dict[str, float]) -> None:
        # a resume refused before any new work writes nothing
        if self.rd.run_fp is not None and self.rd.written - {"times.json"}:
            self.rd.write_json("times.json", {"prior": self.prior_times, "time_s": add_times(self.prior_times, mine)})

    def open(self, fp_identity, calib_fingerprint: str) -> bool:
        """Fix the run's fingerprint from the config and the FP model's identity (the guard of
        ``RunDir``: a run directory of another config or calibration set is refused) and read
        the phase times of earlier processes; True when the directory resumes a run."""
        items = fingerprint_items(self.config or {}, self.trainer_kw, self.device, fp_identity)
        resumed = self.rd.guard(hash_obj(items), calib_fingerprint, items)
        if self.rd.has("times.json"):
            self.prior_times.update(self.rd.read_json("times.json").get("time_s", {}))
        return resumed

    @property
    def times(self) -> Dict[str, float]:
        """Seconds per phase, summed over every process that worked on the run directory."""
        return add_times(self.prior_times, self.timer.times)

    def autocast(self):
        """Forwards outside a Trainer under the trainer's precision (``runtime.autocast``)."""
        return autocast(self.trainer_kw, self.device)

    @contextmanager
    def phase(self, name: str, precision: bool = True):
        """Time the phase ``name``; its forwards run under the trainer's precision unless
        ``precision`` is False (a phase whose forwards a Trainer runs)."""
        with self.timer.phase(name):
            if precision:
                with self.autocast():
                    yield
            else:
                yield

    def log_metrics(self, metrics: dict) -> None:
        log_metrics(self.logger, metrics)

    def log_table(self, key: str, columns, rows) -> None:
        log_table(self.logger, key, columns, rows)
