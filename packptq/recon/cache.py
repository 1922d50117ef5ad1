"""Where a reconstruction unit's activations live, and what they cost.

A unit trains on three tensors over the calibration set: its input in the quantized model
(``q_in``), its input in the FP model (``fp_in``) and the FP output (``fp_out``). A *store*
holds one such tensor [n, ...]; the cache mode chooses the kind:

- ``keep``: float32 in memory (on the training device when it fits, else host memory);
- ``half``: float16 in memory, served as float32 (half the bytes; values rounded to float16);
- ``disk``: float32 rows in a file under the run directory, read a mini-batch at a time
  (memory holds the batches in flight only);
- ``recompute``: ``q_in`` and the FP input of the part that holds the unit are kept, and the FP
  input and output of each mini-batch are computed again by that FP part (one FP forward per
  step; the same numbers as ``keep`` up to the float rounding of a different batch size).

``auto`` takes, unit by unit, the first mode in ``MODES`` (keep, disk, half, recompute: cheapest
step first, measured in experiments/results/cache_memory.md) whose memory fits
``recon.cache_budget``. The stores are
written batch by batch during the forward passes (no list of batches and ``torch.cat``), and the
sequence hands its current activations to the cache instead of copying them.

On a CUDA device, memory stores sit on the device when they take at most half of its free
memory, else in pinned host memory, and mini-batches reach the device by non-blocking copies
with the next batch prepared one step ahead; on a CPU the same code runs without pinning."""
from __future__ import annotations

import math
import os
import re
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from packptq.config import ConfigError

#: cache modes, cheapest reconstruction step first (the order ``auto`` tries them in). Measured
#: (experiments/results/cache_memory.md): a mini-batch from a disk cache costs what one from memory
#: does (the file's pages in the kernel's page cache; 3% of a resnet50 layer1.0 step), float16 more
#: (the conversion), recompute an FP forward of the unit (16% of the step); disk is also exact
MODES = ("keep", "disk", "half", "recompute")
#: mini-batches a disk cache holds in memory at once (the one in use and the next)
IN_FLIGHT = 2

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value) -> Optional[int]:
    """A byte count from ``value``: None (no limit), a number of bytes, or a string such as
    ``"512MB"``, ``"4GB"``, ``"1.5GiB"`` (kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of
    1024). Anything else, or a count below 1 byte, is a ConfigError."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"recon.cache_budget={value!r}; give bytes as a number or e.g. '512MB', '4GB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"recon.cache_budget={value!r}; give bytes as a number or e.g. '512MB', '4GB', "
                              f"'1.5GiB' (units: {', '.join(u for u in _UNITS if u)})")
        number, unit = float(m.group(1)), m.group(2).lower()
    n = number * _UNITS[unit]
    if not math.isfinite(n) or n < 1:
        raise ConfigError(f"recon.cache_budget={value!r} must be at least 1 byte (or null: no limit)")
    return int(n)


def human(n: float) -> str:
    """Bytes as a short string in powers of 1024 (``12.3 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- stores ---------------------------------------------------------------------------------
def _pin(device: torch.device) -> bool:
    """Host buffers are pinned only when they feed a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available()


class MemStore:
    """Rows [n, *shape] of ``dtype`` in memory on ``where`` (pinned when it is the host of a
    CUDA ``device``). ``MemStore.of(t)`` wraps an existing tensor without copying it."""

    def __init__(self, n: int, shape: Sequence[int], dtype: torch.dtype, where: torch.device,
                 device: Optional[torch.device] = None) -> None:
        pin = where.type == "cpu" and _pin(device or where)
        self.t = torch.empty((n, *shape), dtype=dtype, device=where, pin_memory=pin)

    @classmethod
    def of(cls, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> "MemStore":
        s = cls.__new__(cls)
        s.t = t.detach().to(dtype)  # the same tensor when it already has ``dtype``
        return s

    def __len__(self) -> int:
        return len(self.t)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.t.shape[1:])

    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()

    def disk_bytes(self) -> int:
        return 0

    def write(self, start: int, rows: torch.Tensor) -> None:
        self.t[start:start + len(rows)].copy_(rows)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop as stored (a view)."""
        return self.t[start:stop]

    def rows(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows ``idx`` (any order, repeats allowed) as float32 on ``device``."""
        if self.t.device.type != "cpu":
            return self.t[idx.to(self.t.device)].to(device, non_blocking=True).float()
        out = torch.empty((len(idx), *self.shape), dtype=self.t.dtype, pin_memory=_pin(device))
        torch.index_select(self.t, 0, idx, out=out)
        return out.to(device, non_blocking=True).float()


class FileStore:
    """Float32 rows [n, *shape] in the file ``path`` (created, removed when the store is
    collected). Rows are written and read with positioned I/O: the file's pages stay in the
    kernel's page cache, not in this process's memory."""

    def __init__(self, path: Union[str, Path], n: int, shape: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> None:
        self.path, self.n, self._shape, self.dtype = Path(path), n, tuple(shape), dtype
        self.row = math.prod(self._shape) * torch.empty((), dtype=dtype).element_size()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._close = weakref.finalize(self, _close_and_remove, self.fd, str(self.path))
        try:
            os.ftruncate(self.fd, n * self.row)
        except OSError as exc:
            self._close()
            raise ConfigError(f"cannot create the reconstruction cache file {self.path} ({exc.strerror or exc}); "
                              f"free disk space or choose another recon.cache_mode") from None

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._shape

    def nbytes(self) -> int:
        return 0

    def disk_bytes(self) -> int:
        return self.n * self.row

    def close(self) -> None:
        self._close()

    def write(self, start: int, rows: torch.Tensor) -> None:
        buf = memoryview(rows.detach().to("cpu", self.dtype).contiguous().numpy()).cast("B")
        off, done = start * self.row, 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], off + done)

    def _read_into(self, mv: memoryview, offset: int) -> None:
        done = 0
        while done < len(mv):
            got = os.preadv(self.fd, [mv[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from {self.path}")
            done += got

    def slice(self, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, *self._shape), dtype=self.dtype)
        self._read_into(memoryview(out.numpy()).cast("B"), start * self.row)
        return out

    def rows(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty((len(idx), *self._shape), dtype=self.dtype, pin_memory=_pin(device))
        mv = memoryview(out.numpy()).cast("B")
        for j, i in enumerate(idx.tolist()):
            self._read_into(mv[j * self.row:(j + 1) * self.row], i * self.row)
        return out.to(device, non_blocking=True).float()


def _close_and_remove(fd: int, path: str) -> None:
    try:
        os.close(fd)
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


Store = Union[MemStore, FileStore]


# -- the cache ------------------------------------------------------------------------------
def _as_store(t, dtype: torch.dtype) -> Store:
    return t if isinstance(t, (MemStore, FileStore)) else MemStore.of(t, dtype)


class ActivationCache:
    """(q_in, fp_in, fp_out) over the calibration set, [n, ...] each, as tensors or stores;
    ``batches`` yields random float32 mini-batches on ``device`` forever (the next one prepared
    while the current one is in use).

    With ``fp_fn`` (the ``recompute`` mode) ``fp_in`` holds the input of the FP part that
    contains the unit and ``fp_out`` is None: each mini-batch's FP input and output are
    ``fp_fn(rows of fp_in)``, computed without gradients."""

    def __init__(self, q_in, fp_in, fp_out=None, dtype: str = "float32",
                 fp_fn: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
                 device: Optional[torch.device] = None):
        dt = torch.float16 if dtype == "float16" else torch.float32
        self.q_in, self.fp_in = _as_store(q_in, dt), _as_store(fp_in, dt)
        self.fp_out = None if fp_out is None else _as_store(fp_out, dt)
        self.fp_fn = fp_fn
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if (fp_fn is None) == (self.fp_out is None):
            raise ValueError("an activation cache takes exactly one of fp_out and fp_fn")
        if len({len(s) for s in self.stores()}) != 1:
            raise ValueError("activation cache tensors disagree in length")

    def stores(self) -> List[Store]:
        return [s for s in (self.q_in, self.fp_in, self.fp_out) if s is not None]

    def __len__(self) -> int:
        return len(self.q_in)

    def nbytes(self) -> int:
        """Bytes the cache holds in memory (host or device)."""
        return sum(s.nbytes() for s in self.stores())

    def disk_bytes(self) -> int:
        return sum(s.disk_bytes() for s in self.stores())

    @torch.no_grad()
    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_in, fp_in, fp_out) at the sample indices ``idx`` [b], float32 on ``self.device``."""
        q = self.q_in.rows(idx, self.device)
        src = self.fp_in.rows(idx, self.device)
        if self.fp_fn is not None:
            return (q, *self.fp_fn(src))
        return q, src, self.fp_out.rows(idx, self.device)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tuple[torch.Tensor, ...]]:
        n = len(self)
        draw = lambda: torch.randint(n, (min(batch_size, n),), generator=generator)  # noqa: E731
        nxt = self.batch(draw())
        while True:
            cur = nxt
            nxt = self.batch(draw())  # host work done while the device still runs earlier steps
            yield cur


# -- building stores from forward passes ----------------------------------------------------
#: ``make(shape)`` -> an empty store of the calibration set's length for rows of ``shape``
MakeStore = Callable[[Tuple[int, ...]], Store]


def store_maker(mode: str, n: int, device: torch.device, on_device: bool = False,
                folder: Optional[Union[str, Path]] = None) -> MakeStore:
    """Empty stores of ``n`` rows in ``mode``: a file under ``folder`` (``disk``), float16 memory
    (``half``) or float32 memory (``keep``, ``recompute``), on ``device`` when ``on_device`` else
    on the host (pinned when ``device`` is a CUDA device)."""
    if mode == "disk":
        if folder is None:
            raise ValueError("a disk cache needs a folder")

        def file_store(shape: Tuple[int, ...]) -> FileStore:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="cache-", suffix=".f32", dir=folder)
            os.close(fd)
            return FileStore(path, n, shape)

        return file_store
    dtype = torch.float16 if mode == "half" else torch.float32
    where = device if on_device else torch.device("cpu")
    return lambda shape: MemStore(n, shape, dtype, where, device)


@torch.no_grad()
def forward_into(fn: Callable, src: Store, bs: int, device: torch.device, make: MakeStore) -> Store:
    """``fn`` over the rows of ``src`` in batches of ``bs`` on ``device``; each batch's output is
    written into the store ``make`` returns for its shape (allocated at the first batch)."""
    dst = None
    for a in range(0, len(src), bs):
        out = fn(src.slice(a, min(a + bs, len(src))).to(device).float())
        if dst is None:
            dst = make(tuple(out.shape[1:]))
        dst.write(a, out)
    return dst


@torch.no_grad()
def capture_into(fn: Callable, src: Store, module: nn.Module, bs: int, device: torch.device,
                 make: MakeStore, outputs: bool = True) -> Tuple[Store, Optional[Store]]:
    """(inputs, outputs or None) of ``module`` while ``fn`` runs over the rows of ``src``, written
    into stores from ``make`` as each batch passes (the copy happens inside the hook, before any
    later in-place operation can change the tensors)."""
    got: dict = {}
    pos = [0]

    def hook(_m, i, o):
        if got.get("seen"):
            raise RuntimeError("a captured module ran twice in one forward pass")
        got["seen"] = True
        if "in" not in got:
            got["in"] = make(tuple(i[0].shape[1:]))
            got["out"] = make(tuple(o.shape[1:])) if outputs else None
        got["in"].write(pos[0], i[0])
        if outputs:
            got["out"].write(pos[0], o)

    h = module.register_forward_hook(hook)
    try:
        for a in range(0, len(src), bs):
            pos[0], got["seen"] = a, False
            fn(src.slice(a, min(a + bs, len(src))).to(device).float())
    finally:
        h.remove()
    return got["in"], got.get("out")


def capture_batch(fn: Callable, module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``module`` while ``fn`` runs on the batch ``x`` (cloned: later in-place
    operations, e.g. ReLU(inplace=True), would alter them)."""
    got: list = []

    def hook(_m, i, o):
        got.append((i[0].detach().clone(), o.detach().clone()))

    h = module.register_forward_hook(hook)
    try:
        fn(x)
    finally:
        h.remove()
    return got[0]


# -- planning -------------------------------------------------------------------------------
@dataclass
class CachePlan:
    """One unit's cache: sample count ``n``, elements per sample of the unit's quantized input
    (``q``), FP input (``fi``), FP output (``fo``) and of the input of the FP part recomputed in
    ``recompute`` mode (``src``; the FP input itself for a pack), the mode chosen and whether
    its memory stores sit on the training device."""

    key: str
    n: int
    q: int
    fi: int
    fo: int
    src: int
    mode: str = "keep"
    on_device: bool = False

    def memory(self, mode: str, batch_size: int) -> int:
        """Bytes the cache holds in memory (host or device) in ``mode``."""
        per = self.q + self.fi + self.fo
        if mode == "keep":
            return 4 * self.n * per
        if mode == "half":
            return 2 * self.n * per
        if mode == "disk":
            return 4 * IN_FLIGHT * min(batch_size, self.n) * per
        return 4 * self.n * (self.q + self.src)

    def disk(self, mode: str) -> int:
        return 4 * self.n * (self.q + self.fi + self.fo) if mode == "disk" else 0


def choose_modes(plans: List[CachePlan], mode: str, budget: Optional[int], batch_size: int,
                 disk_free: Optional[int] = None, device_free: int = 0) -> List[CachePlan]:
    """Set each plan's mode: ``mode`` itself, or with ``auto`` the first of ``MODES`` whose
    memory fits ``budget`` (None: no limit) and, for ``disk``, whose file fits ``disk_free``
    bytes (None: unchecked). A memory store goes on the device when ``device_free`` (bytes free
    on a CUDA device, 0 elsewhere) holds it twice. A unit that fits in no allowed mode is a
    ConfigError naming it, what each mode needs and the budget."""
    for p in plans:
        allowed = MODES if mode == "auto" else (mode,)

        def fits(m: str) -> bool:
            return (budget is None or p.memory(m, batch_size) <= budget) and \
                (m != "disk" or disk_free is None or p.disk(m) <= disk_free)

        ok = [m for m in allowed if fits(m)]
        if not ok:
            needs = ", ".join(f"{m} {human(p.memory(m, batch_size))}" + (f" (+{human(p.disk(m))} on disk)" if p.disk(m) else "")
                              for m in MODES)
            disk = "" if disk_free is None else f"; {human(disk_free)} free on disk"
            raise ConfigError(f"the activation cache of unit {p.key} ({p.n} samples) does not fit recon.cache_budget="
                              f"{human(budget) if budget is not None else 'null'} with recon.cache_mode={mode}{disk} "
                              f"(memory per mode: {needs}); raise the budget, use recon.cache_mode=auto, "
                              f"or lower data.calib_size / recon.batch_size")
        p.mode = ok[0]
        p.on_device = p.mode != "disk" and 2 * p.memory(p.mode, batch_size) <= device_free
    return plans


def device_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA ``device`` in bytes; 0 for any other device (caches stay on the host)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def plan_table(plans: List[CachePlan], batch_size: int) -> List[str]:
    """Lines describing the planned cache of every unit (mode, memory, disk, placement)."""
    w = max([len(p.key) for p in plans] + [4])
    lines = []
    for p in plans:
        where = "device" if p.on_device else "host"
        disk = f", {human(p.disk(p.mode))} on disk" if p.disk(p.mode) else ""
        lines.append(f"  {p.key.ljust(w)}  {p.mode:<9}  {human(p.memory(p.mode, batch_size)):>10} in {where} memory"
                     f"{disk} (keep: {human(p.memory('keep', batch_size))})")
    return lines
