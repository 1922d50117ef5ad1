"""Memory and step time of one reconstruction unit's activation cache, per cache mode.

Prints measurements and asserts nothing. For timm resnet50 (unit: layer1.0) and
vit_base_patch16_224 (unit: the first transformer block) at 224x224 with random weights (no
downloads), for each calibration count and each ``recon.cache_mode`` (keep, half, disk,
recompute), one child process:

1. holds the FP model and ``n`` random images (the base);
2. builds the unit's cache as ``ReconSequence`` does (``store_maker`` / ``forward_into``: the
   unit's quantized-side and FP inputs through the model's prefix, then the FP output of the
   block unless recomputed); a thread samples RSS every millisecond;
3. runs a few reconstruction steps of the W4A4 block (``reconstruct_unit``, Lightning) on it.

Reported: the planned cache memory (``CachePlan.memory``), the peak RSS growth over the base
while the cache is built (and its ratio to the planned memory), the RSS the cache holds
afterwards, the peak RSS growth during the steps, the whole child's peak RSS (``os.wait4``) and
the median step time (gap between step ends, the first step left out). The planned memory and the
peaks are fitted linearly in ``n`` and extrapolated to 1,024 images. Both sides of the unit's input
hold the FP prefix's output (computed once, copied batch by batch into the second store: a
quantized prefix gives tensors of the same size; only memory and time are measured here). Forward passes use batches of ``--fwd-batch``.

    OMP_NUM_THREADS=1 python experiments/bench_cache_memory.py [--counts 64 128 256 512] \\
        [--steps 4] [--out experiments/results/cache_memory.md]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"resnet50": "resnet", "vit_base_patch16_224": "vit"}
MODES = ("keep", "half", "disk", "recompute")
EXTRAPOLATE_TO = 1024
FETCHES = 15  # timed mini-batch draws per cache


from bench_recon import PeakRSS, rss_bytes  # noqa: E402  (this folder; the same RSS sampling)


# -- the measured child ---------------------------------------------------------------------
def child(model_name: str, mode: str, counts: List[int], step_count: int, steps: int, fwd_bs: int,
          recon_bs: int) -> List[dict]:
    """One model and mode: the cache built for each count in turn (each freed before the next),
    and the steps at ``step_count``."""
    import lightning as L
    import timm
    import torch

    from packptq.quant import QuantConfig, calibrate, fold_bn, quantize_model
    from packptq.recon.cache import ActivationCache, CachePlan, MemStore, forward_into, store_maker
    from packptq.recon.sequence import channel_dim
    from packptq.recon.unit import ReconConfig, UnitRun, reconstruct_unit
    from packptq.runtime import release_freed_memory
    from packptq.zoo import split_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = timm.create_model(model_name, pretrained=False, num_classes=1000).eval()
    fold_bn(model)
    split = split_model(model, MODELS[model_name])
    block = split.blocks[0][1]
    x = torch.randn(max(counts), 3, 224, 224)
    with torch.no_grad():
        h = split.prefix(x[:16])
        out = block(h)
    qblock = quantize_model(copy.deepcopy(block), QuantConfig(w_bits=4, a_bits=4, first_last_bits=4), h[:2])
    calibrate(qblock, h, batch_size=16)
    shapes = (h[0].numel(), out[0].numel())
    del h, out
    results = []
    for n in counts:
        plan = CachePlan("unit", n, shapes[0], shapes[0], shapes[1], shapes[0], mode)
        images = MemStore.of(x[:n])
        gc.collect()
        release_freed_memory()
        base = rss_bytes()
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_CACHE_DIR")) as folder:
            t0 = time.perf_counter()
            with PeakRSS() as pk:  # as ReconSequence builds the first block unit's cache
                make = store_maker(mode, n, cpu, False, folder)
                q_h = forward_into(split.prefix, images, fwd_bs, cpu, make)
                f_h = forward_into(lambda h: h, q_h, fwd_bs, cpu, make)  # the FP prefix gives the same values
                if mode == "recompute":
                    cache = ActivationCache(q_h, f_h, fp_fn=lambda s: (s, block(s)))
                else:
                    cache = ActivationCache(q_h, f_h, forward_into(block, f_h, fwd_bs, cpu, make))
                del q_h, f_h
            build_s = time.perf_counter() - t0
            gc.collect()
            held = rss_bytes() - base
            gen = torch.Generator().manual_seed(0)
            fetch = []
            for _ in range(FETCHES):  # one mini-batch from the cache, as each step draws it
                t1 = time.perf_counter()
                cache.batch(torch.randint(n, (recon_bs,), generator=gen))
                fetch.append(time.perf_counter() - t1)
            r = {"model": model_name, "n": n, "mode": mode, "planned": plan.memory(mode, recon_bs),
                 "fetch_s": sorted(fetch)[len(fetch) // 2],
                 "keep": plan.memory("keep", recon_bs), "nbytes": cache.nbytes(), "disk": cache.disk_bytes(),
                 "build_peak": pk.peak - base, "held": held, "build_s": build_s, "steps_peak": None, "step_s": None}
            if n == step_count:

                class Clock(L.Callback):
                    def __init__(self):
                        self.t: List[float] = []

                    def on_train_batch_end(self, *args, **kwargs):
                        self.t.append(time.perf_counter())

                clock = Clock()
                cfg = ReconConfig(iters=steps, batch_size=recon_bs, log_every=10 ** 6)
                with PeakRSS() as pk_steps:
                    reconstruct_unit(copy.deepcopy(qblock), cache, cfg, UnitRun("unit", 0, channel_dim(qblock),
                                     {"accelerator": "cpu", "callbacks": [clock]}))
                gaps = sorted(b - a for a, b in zip(clock.t, clock.t[1:]))
                r["steps_peak"], r["step_s"] = pk_steps.peak - base, gaps[len(gaps) // 2]
            del cache
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    return results


#: starts the measured child from a small process, so its peak RSS is its own
_LAUNCHER = """import os, sys
pid = os.spawnv(os.P_NOWAIT, sys.executable, [sys.executable] + sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
print("MAXRSS_KIB", ru.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def in_child(args: List[str]) -> List[dict]:
    """This script with ``args`` in a child process (1 thread; glibc returning every block of 64
    KiB or more to the system, so that RSS follows the tensors); its rows, each with the child's
    peak RSS (``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        subprocess.run([sys.executable, "-c", _LAUNCHER, __file__] + args, stdout=out, stderr=err,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    _, kib, rc = stderr.strip().splitlines()[-1].split()
    if int(rc) != 0:
        print(stderr[-3000:], file=sys.stderr)
        return []
    rows = json.loads(stdout.strip().splitlines()[-1])
    for r in rows:
        r["maxrss"] = int(kib) * 1024
    return rows


# -- report ---------------------------------------------------------------------------------
def fit_line(xs: List[float], ys: List[float]):
    """Least-squares (slope, intercept)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def mib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 20:.0f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[64, 128, 256, 512], help="calibration counts")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=4, help="reconstruction steps (the first is not timed)")
    ap.add_argument("--step-count", type=int, default=256, help="the calibration count the steps run at")
    ap.add_argument("--fwd-batch", type=int, default=32, help="batch of the forward passes that build the cache")
    ap.add_argument("--recon-batch", type=int, default=16, help="recon.batch_size of the steps")
    ap.add_argument("--out", default=None, help="write the markdown report here and the plot beside it (.png)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        m, mode = args.child
        print(json.dumps(child(m, mode, args.counts, args.step_count, args.steps, args.fwd_batch, args.recon_batch)))
        return

    cmd = "OMP_NUM_THREADS=1 python experiments/bench_cache_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"[bench] {cmd}", flush=True)
    t_all = time.perf_counter()
    rows: List[dict] = []
    for model in args.models:
        for mode in args.modes:
            got = in_child(["--child", model, mode, "--counts", *map(str, args.counts), "--step-count",
                            str(args.step_count), "--steps", str(args.steps), "--fwd-batch", str(args.fwd_batch),
                            "--recon-batch", str(args.recon_batch)])
            if not got:
                print(f"[bench] {model} {mode}: child failed", flush=True)
            for r in got:
                print(f"[bench] {model} n={r['n']} {mode}: planned {mib(r['planned'])} MiB, build peak "
                      f"+{mib(r['build_peak'])} MiB, held {mib(r['held'])} MiB, steps peak +{mib(r['steps_peak'])} MiB, "
                      f"child {mib(r['maxrss'])} MiB, build {r['build_s']:.1f} s, step "
                      f"{r['step_s'] * 1e3 if r['step_s'] else float('nan'):.0f} ms", flush=True)
            rows.extend(got)
    total = time.perf_counter() - t_all

    import torch

    table = ["| model | n | mode | planned cache, MiB | build: peak RSS growth, MiB | peak / planned | peak / keep size "
             "| held after build, MiB | on disk, MiB | build, s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['n']} | {r['mode']} | {mib(r['planned'])} | {mib(r['build_peak'])} | "
                     f"{r['build_peak'] / r['planned']:.2f} | {r['build_peak'] / r['keep']:.2f} | {mib(r['held'])} | "
                     f"{mib(r['disk'])} | {r['build_s']:.1f} |")
    steps = ["| model | n | mode | step, ms | step / keep | mini-batch from the cache, ms | fetch / keep step "
             "| steps: peak RSS growth, MiB | child peak RSS (all counts), MiB |", "|---|---|---|---|---|---|---|---|---|"]
    keep_step = {r["model"]: r["step_s"] for r in rows if r["mode"] == "keep" and r["step_s"]}
    for r in rows:
        if r["step_s"]:
            ks = keep_step.get(r["model"]) or float("nan")
            steps.append(f"| {r['model']} | {r['n']} | {r['mode']} | {r['step_s'] * 1e3:.0f} | {r['step_s'] / ks:.2f} | "
                         f"{r['fetch_s'] * 1e3:.1f} | {r['fetch_s'] / ks:.3f} | {mib(r['steps_peak'])} | "
                         f"{mib(r['maxrss'])} |")
    extra = ["| model | mode | planned cache, MiB | build: peak RSS growth, MiB | fitted from n |", "|---|---|---|---|---|"]
    fits: Dict[tuple, dict] = {}
    for model in args.models:
        for mode in args.modes:
            rs = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if len(rs) < 2:
                continue
            ns = [r["n"] for r in rs]
            f = {k: fit_line(ns, [r[k] for r in rs]) for k in ("planned", "build_peak")}
            fits[(model, mode)] = f
            at = {k: sl * EXTRAPOLATE_TO + c for k, (sl, c) in f.items()}
            extra.append(f"| {model} | {mode} | {mib(at['planned'])} | {mib(at['build_peak'])} | "
                         f"{', '.join(map(str, ns))} |")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, CPU only; torch {torch.__version__} "
               f"on 1 thread, Python {platform.python_version()}")
    text = "\n".join([
        "# Activation cache memory per mode", "",
        f"Command: `{cmd}` ({total / 60:.1f} min)", "",
        f"Machine: {machine}.", "",
        "Setting: the first stage-1 unit (resnet50 `layer1.0`; vit_base_patch16_224 the first transformer block) at "
        f"224x224, random weights, W4A4 block; forward batches of {args.fwd_batch}, reconstruction batch "
        f"{args.recon_batch}, {args.steps} steps at n = {args.step_count}. One child process per model and mode "
        "builds the caches of every n in turn (each freed before the next); glibc returns blocks of 64 KiB or more "
        "to the system (`MALLOC_MMAP_THRESHOLD_=65536`), so RSS follows the tensors. RSS growth is over a base holding the FP model and the "
        "n images; `planned` is what `recon.cache_budget` is checked against (`CachePlan.memory`); keep size is "
        "the float32 cache. A disk cache's file pages sit in the kernel's page cache, not in the process's RSS. "
        "Step time: median gap between step ends on a shared 2-core machine (wall time); the mini-batch time is the "
        f"median of {FETCHES} draws of one batch from the built cache (`ActivationCache.batch`: gather, and for "
        "`recompute` the FP forward of the block), the part of a step that depends on the mode.", "",
        *table, "",
        f"Reconstruction steps at n = {args.step_count} (peak RSS growth over the same base, the cache included):", "",
        *steps, "",
        f"Linear fit in n, extrapolated to {EXTRAPOLATE_TO} images:", "",
        *extra, "",
    ]) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        plot(rows, fits, args, out.with_suffix(".png"))


def plot(rows, fits, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], args.models):
        for mode in args.modes:
            rs = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if not rs:
                continue
            line, = ax.plot([r["n"] for r in rs], [r["build_peak"] / 2 ** 30 for r in rs], "o-", label=f"{mode}: build peak")
            ax.plot([r["n"] for r in rs], [r["planned"] / 2 ** 30 for r in rs], "x:", color=line.get_color(),
                    label=f"{mode}: planned")
            if (model, mode) in fits:
                s, c = fits[(model, mode)]["build_peak"]
                xs = [rs[-1]["n"], EXTRAPOLATE_TO]
                ax.plot(xs, [(s * v + c) / 2 ** 30 for v in xs], "--", color=line.get_color(), alpha=0.6)
        ax.set_title(f"{model}: unit cache memory (dashed: linear extrapolation)")
        ax.set_xlabel("calibration images")
        ax.set_ylabel("GiB (RSS growth over the base)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
