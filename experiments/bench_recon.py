"""Benchmark of unit reconstruction on the embedded quickstart.

Prints measurements and asserts nothing. In one process, on the Hessian packs of resnet18 on
mnist5k (W4A4, 256 calibration images), headline numbers on the largest pack:

1. median time per reconstruction step under Lightning (``reconstruct_unit``) against a bare
   PyTorch loop running the same step (the same module's ``step_loss``, optimizer and
   scheduler, the same batches and seed: the two give the same losses);
2. the same step against one plain FP forward+backward of the pack on the same batch (the
   floor: the quantized step adds fake quantization and AdaRound on top of it), and the step
   as it runs without the one-pass soft rounding and the memory policy (``step_mode``);
3. the scoring phase (``packing.hessian_scores``) against one FP forward+backward pass of the
   whole model over the calibration set;
4. memory, in child processes: RSS growth while the largest pack's activation cache is built,
   per ``recon.cache_mode``, against its size in bytes, and the peak RSS of a whole Pack-PTQ run
   (``os.wait4`` rusage).

Lightning, the bare loop and the FP floor alternate, ``--repeats`` times each, so that load
from other jobs falls on all of them; a step's time is the gap between consecutive step ends
(the first step, which holds set-up work, is left out), in wall time and in this process's
CPU time (steadier on a shared machine).

    OMP_NUM_THREADS=1 python experiments/bench_recon.py [--iters 50] [--repeats 5] \\
        [--run-iters N] [--out experiments/results/bench_recon.md]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import lightning as L
import torch
import torch.nn.functional as F

from packptq import fp
from packptq.api import compose
from packptq.artifacts import RunDir
from packptq.calibration import calibrate_twins
from packptq.context import RunContext
from packptq.data import build_datamodule
from packptq.packing import make_packs
from packptq.quant import freeze
from packptq.recon import ReconConfig, ReconSequence, UnitReconstruction, UnitRun, plan_units, reconstruct_unit
from packptq.recon.sequence import channel_dim as _channel_dim
from packptq.recon.unit import rec_loss
from packptq.runtime import release_freed_memory, reuse_freed_memory, trainer_kwargs
from packptq.scores import hessian_scores
from packptq.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SCORE_BS = 128  # the pipeline scores with min(data.batch_size, 128)
OVERRIDES = ["logger=none", "threads=1", "progress=false", "packing=hessian", "run_dir=unused"]


# -- set-up: the pipeline's fp / calibrate / score / pack phases, kept in memory -----------
def compose_cfg(extra: List[str] = ()):
    return compose(OVERRIDES + list(extra))


class Setup:
    """The FP model (trained once, cached), the calibrated W4A4 twins and the calibration
    tensors, built by the package's phases as ``pipeline.run`` builds them (``fp``,
    ``calibration``); activation caches come from ``ReconSequence.walk``, the loop
    ``pipeline.run`` reconstructs with."""

    def __init__(self, extra: List[str] = ()) -> None:
        cfg = compose_cfg(extra)
        self.cfg = cfg
        self.seed = int(cfg.seed)
        settings = Settings.of(cfg)
        self.qcfg, self.rcfg, self.pcfg = settings.quant, settings.recon, settings.packing
        dm = build_datamodule(cfg.data)
        model = fp.build(settings.model, dm)
        dm.setup()
        self.x, self.y = dm.calib_tensors()
        self.trainer_kwargs = trainer_kwargs(cfg.trainer)
        model = fp.obtain(model, dm, settings.model, Path(cfg.cache_dir), self.trainer_kwargs)
        self.twins = calibrate_twins(model, "resnet", self.qcfg, self.x, self.seed, int(cfg.data.batch_size),
                                     torch.device("cpu"))
        self.fp_ref, self.names = self.twins.fp, self.twins.block_names

    def scores(self) -> dict:
        return hessian_scores(self.twins.fsplit, self.twins.qsplit, self.x, self.y, self.pcfg.loss,
                              batch_size=min(int(self.cfg.data.batch_size), SCORE_BS), progress=False)

    def largest_pack(self, scores: dict) -> List[int]:
        packs = make_packs(self.pcfg, self.names, scores["S"], self.seed)
        n_w = lambda p: sum(q.numel() for b in p for q in self.twins.fsplit.blocks[b][1].parameters())  # noqa: E731
        return max(packs, key=lambda p: (len(p), n_w(p)))

    def sequence(self, packs: List[List[int]], mode: str, folder: str) -> ReconSequence:
        """The reconstruction sequence of ``packs`` (prefix layers, packs, suffix layers) with
        every cache in ``mode``, its files under ``folder``."""
        ctx = RunContext(RunDir(folder), torch.device("cpu"), self.trainer_kwargs, self.seed,
                         int(self.cfg.data.batch_size))
        rcfg = dataclasses.replace(self.rcfg, cache_mode=mode, cache_budget=None, predict=False)
        return ReconSequence(ctx, self.twins, plan_units("packs", packs, self.twins), rcfg)

    def unit_caches(self, packs: List[List[int]], folder: str) -> Dict[str, tuple]:
        """{unit key: (quantized module, FP module, activation cache)} of every unit in
        float32 memory, each with the units before it at their calibrated RTN state."""
        out = {}
        seq = self.sequence(packs, "keep", folder)
        seq.walk(self.x, lambda i, q, f, make: out.__setitem__(seq.units[i].key, (q, f, make())))
        return out


# -- 1. Lightning against a bare loop ------------------------------------------------------
def now() -> Tuple[float, float]:
    """(wall, CPU) seconds. The process's CPU time leaves out the time other jobs hold the cores:
    on a shared machine it is the steadier of the two, wall time the one a user waits for."""
    return time.perf_counter(), time.process_time()


class StepClock(L.Callback):
    """``now()`` at the end of every training step, nothing else."""

    def __init__(self) -> None:
        self.t: List[Tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t.append(now())


def lightning_run(chain_q, cache, rcfg, seed, channel_dim, trainer_kwargs):
    unit = copy.deepcopy(chain_q)
    clock = StepClock()
    kw = dict(trainer_kwargs, callbacks=[clock])
    t0 = now()
    losses = reconstruct_unit(unit, cache, rcfg, UnitRun("bench", seed, channel_dim, kw))
    return losses, clock.t, since(t0)


@contextlib.contextmanager
def step_mode(before: bool):
    """``before``: soft rounding as tensor operations and glibc's default allocation (every
    large tensor a fresh mmap), the step without ``packptq.quant.kernels`` and
    ``runtime.reuse_freed_memory``; else the memory policy of ``reconstruct_unit``."""
    if not before:
        with reuse_freed_memory():
            yield
        return
    old = os.environ.get("PACKPTQ_KERNELS")
    os.environ["PACKPTQ_KERNELS"] = "eager"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PACKPTQ_KERNELS")
        else:
            os.environ["PACKPTQ_KERNELS"] = old


def bare_run(chain_q, cache, rcfg: ReconConfig, seed, channel_dim, before: bool = False):
    """``reconstruct_unit`` without Lightning: the same module's step (``step_loss``), optimizer
    and scheduler (``configure_optimizers``), batches and seeds, in a plain loop (``before``:
    the step as ``step_mode(True)`` runs it)."""
    with step_mode(before):
        return _bare_run(chain_q, cache, rcfg, seed, channel_dim)


def _bare_run(chain_q, cache, rcfg: ReconConfig, seed, channel_dim):
    t0 = now()
    unit = copy.deepcopy(chain_q)
    torch.manual_seed(seed)
    module = UnitReconstruction(unit, rcfg, "bench", channel_dim)
    module.on_train_start()
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    batches = cache.batches(rcfg.batch_size, torch.Generator().manual_seed(seed))
    losses, t = [], []
    for step in range(rcfg.iters):
        rec, loss = module.step_loss(next(batches), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(rec.detach())
        t.append(now())
    freeze(unit)
    return [float(v) for v in losses], t, since(t0)


# -- 2. the floor: a plain FP forward+backward of the pack ------------------------------
def fp_step_run(chain_f, cache, rcfg, seed, channel_dim):
    with step_mode(False):  # the floor under the same allocation as the step
        return _fp_step_run(chain_f, cache, rcfg, seed, channel_dim)


def _fp_step_run(chain_f, cache, rcfg, seed, channel_dim):
    unit = copy.deepcopy(chain_f)
    params = [p for p in unit.parameters()]
    for p in params:
        p.requires_grad_(True)
    batches = cache.batches(rcfg.batch_size, torch.Generator().manual_seed(seed))
    t = []
    for _ in range(rcfg.iters):
        _, fp_in, fp_out = next(batches)
        loss = rec_loss(unit(fp_in), fp_out, channel_dim)
        for p in params:
            p.grad = None
        loss.backward()
        t.append(now())
    return t


# -- 3. scoring against one FP forward+backward over the calibration set -----------------
def fp_pass(model, x, y, bs: int) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    for i in range(0, len(x), bs):
        loss = F.cross_entropy(model(x[i:i + bs]), y[i:i + bs])
        loss.backward()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)


# -- 4. memory (child processes) -----------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every millisecond in a thread; ``peak`` is the largest seen."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), False
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._th.join()
        self.peak = max(self.peak, rss_bytes())


def child_cache(mode: str) -> dict:
    """RSS growth while the largest pack's cache is built in ``mode`` as ``recon.sequence``
    builds it (from the images through the prefix and the blocks before the pack into stores of
    the mode, then the FP output of the pack) and batches are drawn from it; ``base`` is taken with
    only the models and images in memory. The peak includes the batch-256 activations of the
    forward passes that produce it."""
    torch.set_num_threads(1)
    s = Setup()
    scores = s.scores()
    packs = make_packs(s.pcfg, s.names, scores["S"], s.seed)
    key = f"pack_{packs.index(s.largest_pack(scores)):02d}"
    got = {}

    class Done(Exception):
        pass

    def build(folder: str, measure: bool) -> None:
        seq = s.sequence(packs, mode, folder)

        def visit(i, q, f, make):
            if seq.units[i].key != key:
                return
            cache = make()
            batches = cache.batches(32, torch.Generator().manual_seed(0))
            for _ in range(20):
                next(batches)
            gc.collect()
            if measure:
                got.update(cache=cache, plan=seq.plans[i], held=rss_bytes())
            raise Done  # the units after it play no part

        try:
            seq.walk(s.x, visit)
        except Done:
            pass

    with tempfile.TemporaryDirectory() as folder:
        build(folder, False)  # once before measuring, so that lazily allocated library state settles
        gc.collect()
        release_freed_memory()
        base = rss_bytes()
        with PeakRSS() as pk:
            build(folder, True)
        cache, plan = got["cache"], got["plan"]
        shape = [len(cache)] + list(cache.q_in.shape)
        return {"mode": mode, "nbytes": cache.nbytes(), "planned": plan.memory(mode, 32), "keep": plan.memory("keep", 32),
                "disk": cache.disk_bytes(), "shape": shape, "peak": pk.peak - base, "held": got["held"] - base}


def child_run(run_dir: str, extra: List[str]) -> None:
    from packptq import pipeline

    cfg = compose_cfg([f"run_dir={run_dir}"] + extra)
    pipeline.run(cfg, overrides=extra)


#: Starts the measured child from a small process: a child forked from this (large) one would
#: count this process's pages in its peak RSS until it execs.
_LAUNCHER = """import os, sys
pid = os.spawnv(os.P_NOWAIT, sys.executable, [sys.executable] + sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
print("MAXRSS_KIB", ru.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def in_child(args: List[str], env: Dict[str, str] = None) -> Tuple[str, str, int, float, int]:
    """Run this script with ``args`` in a child process, 1 thread; return (stdout, stderr, exit
    code, seconds, peak RSS in bytes of that child alone, from ``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _LAUNCHER, __file__] + args, stdout=out, stderr=err,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        secs = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    _, kib, rc = stderr.strip().splitlines()[-1].split()
    return stdout, stderr, int(rc), secs, int(kib) * 1024


# -- report -------------------------------------------------------------------------------
def med(xs) -> float:
    return statistics.median(list(xs))


def ms(t: Tuple[float, float]) -> str:
    return f"{t[0] * 1e3:.1f} / {t[1] * 1e3:.1f}" if isinstance(t, tuple) else f"{t * 1e3:.1f}"


def sec(t) -> str:
    return f"{t[0]:.2f} / {t[1]:.2f}" if isinstance(t, tuple) else f"{t:.2f}"


def since(t0: Tuple[float, float]) -> Tuple[float, float]:
    t1 = now()
    return t1[0] - t0[0], t1[1] - t0[1]


def gaps(t: List[Tuple[float, float]], k: int) -> List[float]:
    """Differences of consecutive ``now()`` readings: k = 0 wall, 1 CPU."""
    return [b[k] - a[k] for a, b in zip(t, t[1:])]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="reconstruction steps per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side, alternating")
    ap.add_argument("--run-iters", type=int, default=None,
                    help="recon.iters of the whole-run RSS child (default: the config's)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the child processes of item 4")
    ap.add_argument("--child", choices=["cache", "run"], help=argparse.SUPPRESS)
    ap.add_argument("--child-arg", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "cache":
        print(json.dumps(child_cache(args.child_arg[0])))
        return
    if args.child == "run":
        child_run(args.child_arg[0], args.child_arg[1:])
        return

    torch.set_num_threads(1)
    cmd = "OMP_NUM_THREADS=1 python experiments/bench_recon.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"[bench] {cmd}", flush=True)
    s = Setup()
    rcfg = ReconConfig(**{**s.rcfg.__dict__, "iters": args.iters})

    # 3. scoring vs an FP forward+backward over the calibration set (the scores give the packs)
    sc_t, fp_t = [], []
    for _ in range(3):
        t0 = now()
        scores = s.scores()
        sc_t.append(since(t0))
        t0 = now()
        fp_pass(s.fp_ref, s.x, s.y, SCORE_BS)
        fp_t.append(since(t0))
    packs = make_packs(s.pcfg, s.names, scores["S"], s.seed)
    largest = s.largest_pack(scores)
    names = lambda p: "+".join(s.names[b] for b in p)  # noqa: E731
    print(f"[bench] packs {[names(p) for p in packs]}; largest {names(largest)}; "
          f"{rcfg.iters} steps x {args.repeats} runs per side", flush=True)

    # 1 and 2 on every pack: Lightning, bare loop and the FP floor, alternating. Per run: the
    # median over its steps, wall and CPU; over runs: the median of those.
    per_pack = {}
    with tempfile.TemporaryDirectory() as folder:
        caches = s.unit_caches(packs, folder)
    suffix = [k for k in caches if k.startswith("suffix_")][-1]
    # the stem conv and the classifier (one-layer units), then the packs
    for label, key in [("stem conv (prefix)", "prefix_00"), *((names(p), f"pack_{j:02d}") for j, p in enumerate(packs)),
                       ("classifier (suffix)", suffix)]:
        chain_q, chain_f, cache = caches[key]
        cdim = _channel_dim(chain_q)
        m = {"n_alpha": sum(p.numel() for p in chain_f.parameters() if p.dim() > 1),
             "shape": [len(cache)] + list(cache.q_in.shape),
             "L": [], "B": [], "F": [], "O": [], "L_fit": [], "B_fit": [], "same": [], "dev": []}
        for r in range(args.repeats):
            l_loss, t, fit = lightning_run(chain_q, cache, rcfg, s.seed, cdim, s.trainer_kwargs)
            m["L"].append((med(gaps(t, 0)), med(gaps(t, 1))))
            m["L_fit"].append(fit)
            b_loss, t, fit = bare_run(chain_q, cache, rcfg, s.seed, cdim)
            m["B"].append((med(gaps(t, 0)), med(gaps(t, 1))))
            m["B_fit"].append(fit)
            t = fp_step_run(chain_f, cache, rcfg, s.seed, cdim)
            m["F"].append((med(gaps(t, 0)), med(gaps(t, 1))))
            o_loss, t, _ = bare_run(chain_q, cache, rcfg, s.seed, cdim, before=True)
            m["O"].append((med(gaps(t, 0)), med(gaps(t, 1))))
            m["same"].append(l_loss == b_loss)
            m["dev"].append(max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(l_loss, o_loss)))
            print(f"[bench] {label} run {r}: step (wall / CPU ms) Lightning {ms(m['L'][-1])}, bare "
                  f"{ms(m['B'][-1])}, FP fwd+bwd {ms(m['F'][-1])}, before {ms(m['O'][-1])}; whole fit {sec(m['L_fit'][-1])} vs "
                  f"{sec(m['B_fit'][-1])} s", flush=True)
        for k in ("L", "B", "F", "O", "L_fit", "B_fit"):
            m[k] = (med(v[0] for v in m[k]), med(v[1] for v in m[k]))
        per_pack[label] = m
    m = per_pack[names(largest)]
    sc, fp = (med(v[0] for v in sc_t), med(v[1] for v in sc_t)), (med(v[0] for v in fp_t), med(v[1] for v in fp_t))
    rows = [  # (measurement, measured (wall, CPU), reference (wall, CPU), unit, note)
        ("1. reconstruction step: Lightning / bare loop", m["L"], m["B"], "ms", "target <= 1.10"),
        ("1'. whole fit incl. Trainer set-up: Lightning / bare", m["L_fit"], m["B_fit"], "s",
         f"{rcfg.iters} steps"),
        ("2. reconstruction step / FP fwd+bwd of the pack", m["L"], m["F"], "ms", "the floor"),
        ("3. hessian_scores / FP fwd+bwd over the calib set", sc, fp, "s",
         f"{len(s.names)} blocks, {len(s.x)} images, batch {SCORE_BS}"),
    ]
    table = ["| measurement | measured, wall | reference, wall | ratio, wall | measured, CPU | reference, CPU "
             "| ratio, CPU | note |", "|---|---|---|---|---|---|---|---|"]
    for name, a, b, unit, note in rows:
        f = ms if unit == "ms" else sec
        table.append(f"| {name} | {f(a[0])} {unit} | {f(b[0])} {unit} | {a[0] / b[0]:.3f} | {f(a[1])} {unit} | "
                     f"{f(b[1])} {unit} | {a[1] / b[1]:.3f} | {note} |")
    pack_table = ["| pack | rounding variables | cache (each of 3) | step Lightning | step bare | Lightning / bare "
                  "| FP fwd+bwd | step / FP | identical losses | step before | before / step | loss vs before |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, m in per_pack.items():
        (lw, lc), (bw, bc), (fw, fc), (ow, oc) = m["L"], m["B"], m["F"], m["O"]
        pack_table.append(f"| {k} | {m['n_alpha']} | {m['shape']} | {ms(m['L'])} | {ms(m['B'])} | "
                          f"{lw / bw:.3f} / {lc / bc:.3f} | {ms(m['F'])} | {lw / fw:.2f} / {lc / fc:.2f} | "
                          f"{sum(m['same'])}/{len(m['same'])} | {ms(m['O'])} | {ow / lw:.2f} / {oc / lc:.2f} | "
                          f"{max(m['dev']):.1e} |")

    # 4. memory, in child processes
    mem = ["| measurement | measured | reference | ratio | note |", "|---|---|---|---|---|"]
    if not args.skip_memory:
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        for mode in ("keep", "half", "disk", "recompute"):
            # a fixed mmap threshold: glibc then returns every large block, and RSS follows tensors
            out, err, rc, _, _ = in_child(["--child", "cache", "--child-arg", mode],
                                          {"MALLOC_MMAP_THRESHOLD_": "65536"})
            if rc != 0:
                print(err[-3000:])
                continue
            c = json.loads(out.strip().splitlines()[-1])
            # a disk cache holds batches in memory, its rows in a file: its reference is the float32 size
            ref, what = (c["keep"], "float32 size (the file)") if mode == "disk" else (c["planned"], "cache size")
            mem.append(f"| 4a. cache ({mode}): peak RSS growth while built / {what} | {mib(c['peak'])} | "
                       f"{mib(ref)} | {c['peak'] / ref:.2f} | held afterwards {mib(c['held'])} "
                       f"({c['held'] / ref:.2f} x reference); planned memory {mib(c['planned'])}, on disk "
                       f"{mib(c['disk'])}, float32 size {mib(c['keep'])}; 3 x {c['shape']} |")
        with tempfile.TemporaryDirectory() as td:
            extra = [f"recon.iters={args.run_iters}"] if args.run_iters is not None else []
            _, err, rc, secs, rss = in_child(["--child", "run", "--child-arg", td]
                                             + [f"--child-arg={e}" for e in extra])
            if rc != 0:
                print(err[-3000:])
            it = args.run_iters if args.run_iters is not None else s.rcfg.iters
            mem.append(f"| 4b. whole Pack-PTQ run: peak RSS / 1.2 GB target | {rss / 1e9:.3f} GB | 1.2 GB | "
                       f"{rss / 1.2e9:.2f} | {len(s.x)} calibration images, recon.iters={it}, {secs:.0f} s wall, "
                       f"exit {rc} |")

    machine = (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, CPU only; torch "
               f"{torch.__version__} on 1 thread, lightning {L.__version__}, Python {platform.python_version()}")
    text = "\n".join([
        "# Reconstruction benchmark", "",
        f"Command: `{cmd}`", "",
        f"Machine: {machine}.", "",
        f"Setting: resnet18 on mnist5k (the embedded quickstart), W{s.qcfg.w_bits}A{s.qcfg.a_bits}, {len(s.x)} "
        f"calibration images, Hessian packing ({s.pcfg.loss} score) -> {[names(p) for p in packs]}; the largest "
        f"pack is {names(largest)}. Batch {rcfg.batch_size}, {rcfg.iters} steps per run ({rcfg.warmup:.0%} without "
        f"the regulariser); per-step time = median gap between step ends; tables = medians over {args.repeats} "
        "runs, Lightning, bare loop and FP floor alternating. Wall time includes waiting for the other jobs on "
        "the machine; CPU time (this process) does not.", "",
        *table, "",
        "Items 1 and 2 on every unit (the stem conv, the packs, the classifier), wall / CPU (bare loop: the same module's `step_loss`, optimizer and "
        "scheduler in a plain loop; identical losses: the same seed gave the same per-step losses; the FP "
        "floor runs under the step's memory policy; step before: the bare loop with soft rounding as tensor "
        "operations and glibc's default allocation, `PACKPTQ_KERNELS=eager` without "
        "`runtime.reuse_freed_memory`; loss vs before: the largest relative difference of a step's loss, "
        "Lightning against that loop):", "",
        *pack_table, "",
        "Memory:", "",
        *mem, "",
    ]) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
