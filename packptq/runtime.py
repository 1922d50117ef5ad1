"""What a run needs from its process: torch threads, quiet Lightning, the validated trainer
arguments and the device they select, phase timing, and logging helpers that never fail a run."""
from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from packptq.config import ConfigError

#: what packptq passes to every lightning.Trainer it builds; trainer.* overrides these
TRAINER_DEFAULTS = dict(accelerator="auto", devices=1, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)


def step_bar(bar):
    """A Lightning callback advancing the tqdm ``bar`` by one per training step (so its ETA is
    weighted by steps, whatever the phase or unit), or None without a bar."""
    if bar is None:
        return None
    import lightning as L

    class _StepBar(L.Callback):
        def on_train_batch_end(self, *args, **kwargs) -> None:
            bar.update(1)

    return _StepBar()


class Timer:
    """Wall time per phase, in seconds (a phase entered twice adds up). ``on_phase(times)`` is
    called after each phase that ends without an error (e.g. to persist the times)."""

    def __init__(self, on_phase=None) -> None:
        self.times: Dict[str, float] = {}
        self.on_phase = on_phase

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 3)
        if self.on_phase is not None:
            self.on_phase(self.times)


def trainer_kwargs(section: Optional[DictConfig]) -> dict:
    """The ``trainer`` section as lightning.Trainer keyword arguments; an unknown key is a
    ConfigError before any compute."""
    import lightning as L

    kwargs = OmegaConf.to_container(section, resolve=True) if section else {}
    kwargs.pop("_target_", None)
    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    bad = sorted(set(kwargs) - known)
    if bad:
        raise ConfigError(f"unknown trainer option(s) {bad}; trainer.* takes lightning.Trainer arguments")
    return kwargs


#: trainer.precision values packptq runs, and the autocast dtype of each (None: plain float32).
#: Weights, quantizer parameters and activation caches stay float32 under every one of them.
AUTOCAST = {"32-true": None, "32": None, "16-mixed": torch.float16, "16": torch.float16,
            "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}


def check_precision(kwargs: dict) -> str:
    """``kwargs['precision']`` (default 32-true) as a string, if packptq runs it, else a
    ConfigError: the *-true precisions other than 32 convert the model itself (Lightning leaves
    it in float64 / float16 after a fit), which the quantizers and caches do not follow."""
    p = str(kwargs.get("precision", "32-true"))
    if p not in AUTOCAST:
        raise ConfigError(f"trainer.precision={p} is not supported; use one of "
                          f"{', '.join(k for k in AUTOCAST if '-' in k)} (float32 weights, optionally "
                          f"under autocast)")
    return p


def autocast_dtype(kwargs: dict, device: torch.device) -> Optional[torch.dtype]:
    """The dtype forward passes outside a Trainer run under for ``kwargs['precision']`` on
    ``device`` (None: float32), as Lightning's mixed precision picks it: float16 AMP is not
    available on the CPU, where 16-mixed runs as bfloat16."""
    dt = AUTOCAST[check_precision(kwargs)]
    if dt is torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return dt


def autocast(kwargs: dict, device: torch.device):
    """A context in which calibration, scoring and evaluation forwards follow the trainer's
    precision (``torch.autocast`` on ``device``'s type; a no-op for 32-true)."""
    dt = autocast_dtype(kwargs, device)
    return nullcontext() if dt is None else torch.autocast(device.type, dtype=dt)


def device_of(kwargs: dict) -> torch.device:
    """The device Lightning picks for ``kwargs`` (accelerator and devices, e.g. devices=[1] on
    a GPU machine: cuda:1): forward passes outside a Trainer (calibration, scores, evaluation)
    run where training runs. Checks the precision, and that one device is selected (units are
    fitted one after another on a single device)."""
    from lightning.fabric import Fabric

    check_precision(kwargs)
    try:
        fabric = Fabric(accelerator=kwargs.get("accelerator", "auto"), devices=kwargs.get("devices", 1),
                        precision=kwargs.get("precision", "32-true"))
    except Exception as exc:  # e.g. accelerator=gpu on a machine without one
        raise ConfigError(f"trainer settings cannot run here: {str(exc).splitlines()[0]}") from None
    if fabric.world_size > 1:
        raise ConfigError(f"trainer.devices={kwargs.get('devices')} selects {fabric.world_size} devices; packptq "
                          f"runs on one (give one index, e.g. trainer.devices=[1])")
    return fabric.device


def check_threads(threads) -> Optional[int]:
    """The ``threads`` setting as an int >= 1 (None: unset), else a ConfigError."""
    if threads in (None, "", "null"):
        return None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}") from None
    if n < 1 or str(n) != str(threads).strip():
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    return n


def check_seed(seed) -> int:
    """The run ``seed`` as an int in [0, 2**63), else a ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


def set_threads(threads) -> None:
    """Torch threads: the config's, else one per job under submitit's local executor (jobs of a
    sweep run side by side), else the SLURM allocation's CPUs, else torch's default."""
    threads = check_threads(threads)
    if threads is None:
        env = 1 if os.environ.get("SUBMITIT_LOCAL_JOB_ID") else os.environ.get("SLURM_CPUS_PER_TASK")
        threads = int(env) if env else None
    if threads:
        torch.set_num_threads(threads)


@contextmanager
def one_thread(device: torch.device):
    """Run the body on one torch thread when ``device`` is the CPU (then restore the count).
    CPU kernels split reductions (batch sums of gradients, BatchNorm statistics) into one
    partial sum per thread, so a result trained with 2 threads differs in its last bits from
    one trained with 1, and training amplifies those bits into different weights; one thread
    gives the same weights whatever ``threads`` the run has."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def reuse_freed_memory():
    """Inside the ``with`` body, freed heap memory stays with the process for the next
    allocation, and ``release_freed_memory`` hands it back at the end.

    A reconstruction step allocates and frees the same weight-sized tensors every step (the
    quantized weights, their gradients, the optimizer's work). glibc serves each one with a
    fresh ``mmap`` and returns it on free, so every step pays a page fault per 4 KiB of them:
    a copy of a 40 MB tensor took 26 ms that way against 4 ms from reused memory (measured,
    1 thread). Here ``mmap`` is off and the heap is not trimmed while the body runs. A no-op
    without glibc; the CUDA caching allocator does the same for device memory."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    try:
        yield
    finally:
        # glibc's defaults (mmap above 128 KiB, trim above 128 KiB of free top)
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: +200 MB of RSS over the
    layer4 units of resnet18, measured); a no-op where there is no glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def quiet_lightning() -> None:
    """Each unit is one Trainer.fit: keep Lightning's per-fit banners and known-benign warnings
    (eval-mode units, its own deprecations) out of the run's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pat in (".*module\\(s\\) in eval mode.*", ".*LeafSpec.*", ".*does not have many workers.*",
                ".*litlogger.*", ".*GPU available.*"):
        warnings.filterwarnings("ignore", message=pat)


def log_metrics(logger, metrics: dict) -> None:
    if logger is not None:
        logger.log_metrics({k: v for k, v in metrics.items() if v is not None})


def log_table(logger, key: str, columns: List[str], rows: List[list]) -> None:
    if logger is not None and hasattr(logger, "log_table"):
        try:
            logger.log_table(key=key, columns=columns, data=rows)
        except Exception:  # tables are a nicety; never fail a run on them
            pass
