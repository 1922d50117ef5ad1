"""Faults at the edges of a run, tried from outside as a user meets them: each case runs the
``packptq`` command line in a subprocess (with whatever ``PYTHONPATH`` selects the code) and
records the exit status, the ``packptq: error:`` lines, whether a traceback was printed, the
seconds it took and what it left behind. Prints one markdown table row per case (the table of
experiments/results/faults.md).

    PYTHONPATH=. python experiments/fault_probe.py [--only CASE ...] [--work DIR]

Needs a Linux machine where ``mount -t tmpfs`` works (the disk-full case), no route to
huggingface.co (the offline case) and no SLURM (the SLURM case)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = ["logger=none", "data=digits", "data.calib_size=64", "model=resnet18", "quant=w4a4",
        "+model.kwargs.channels=[8,16,32,64]", "model.train_epochs=4", "recon.iters=20", "progress=false",
        "threads=1"]


def env(cache: Path, **extra) -> dict:
    e = {**os.environ, "PACKPTQ_CACHE": str(cache), "PACKPTQ_THREADS": "1", "WANDB_MODE": "offline"}
    e.pop("HYDRA_FULL_ERROR", None)
    e.update(extra)
    return e


def packptq(*args) -> list:
    return [sys.executable, "-m", "packptq", *args]


def observe(p_rc: int, out: str, err: str, seconds: float) -> dict:
    errors = [ln for ln in err.splitlines() if ln.startswith("packptq: error")]
    return {"rc": p_rc, "error_lines": len(errors), "first_error": (errors or [""])[0][:160],
            "traceback": "Traceback" in out + err, "s": round(seconds, 1),
            "tail": err.strip().splitlines()[-1][:160] if err.strip() else ""}


def run(cmd, e, cwd, timeout=900, **kw) -> dict:
    t0 = time.time()
    p = subprocess.run(cmd, env=e, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    return observe(p.returncode, p.stdout, p.stderr, time.time() - t0)


def tmp_files(d: Path) -> list:
    return sorted(p.name for p in d.rglob("*.tmp")) if d.exists() else []


def snapshot(d: Path, skip=("packptq.log",)) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name not in skip}


# -- the cases -----------------------------------------------------------------------------------
def case_misspelt_key(w: Path, cache: Path) -> dict:
    args = [*TINY, "recon.iter=5", f"hydra.run.dir={w / 'run'}"]
    return {"cmd": "packptq <tiny> recon.iter=5", **run(packptq(*args), env(cache), w)}


def case_bad_override_syntax(w: Path, cache: Path) -> dict:
    args = [*TINY, "quant.w_bits=[4", f"hydra.run.dir={w / 'run'}"]
    return {"cmd": "packptq <tiny> 'quant.w_bits=[4'", **run(packptq(*args), env(cache), w)}


def case_pretrained_offline(w: Path, cache: Path) -> dict:
    args = [*TINY, "model=timm", "model.name=resnet18", "model.pretrained=true", f"hydra.run.dir={w / 'run'}"]
    e = env(cache, HF_HOME=str(w / "hf"))  # an empty hub cache: the weights must be downloaded
    return {"cmd": "HF_HOME=<empty> packptq <tiny> model=timm model.name=resnet18 model.pretrained=true",
            **run(packptq(*args), e, w)}


def case_slurm_without_slurm(w: Path, cache: Path) -> dict:
    args = ["-m", "hydra/launcher=slurm", *TINY, "seed=0,1", f"hydra.sweep.dir={w / 'sweep'}"]
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "srun").exists())
    return {"cmd": "packptq -m hydra/launcher=slurm <tiny> seed=0,1  (no srun/sbatch on PATH)",
            **run(packptq(*args), env(cache, PATH=path), w)}


def case_one_class(w: Path, cache: Path) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(w / "one.npz", x=rng.normal(size=(300, 1, 16, 16)).astype(np.float32), y=np.zeros(300, np.int64))
    args = [*TINY, "data=npz", f"data.path={w / 'one.npz'}", "data.n_test=50", "model.train_batch_size=32",
            f"hydra.run.dir={w / 'run'}"]
    return {"cmd": "packptq <tiny> data=npz data.path=one.npz  (every label 0)", **run(packptq(*args), env(cache), w)}


def case_zero_step_after_val(w: Path, cache: Path) -> dict:
    fresh = w / "cache"  # an empty FP cache: whatever lands there was trained by this command
    args = [*TINY, "data.calib_size=16", "data.val_size=1350", "model.train_batch_size=64", f"hydra.run.dir={w / 'run'}"]
    r = run(packptq(*args), env(fresh), w)
    r["cache_entries"] = sorted(p.name for p in (fresh / "fp").glob("*.pt")) if (fresh / "fp").exists() else []
    return {"cmd": "packptq <tiny> data.calib_size=16 data.val_size=1350 model.train_batch_size=64  (1397 training samples)", **r}


def case_diverged_recon(w: Path, cache: Path) -> dict:
    inject = ("import torch, sys; from packptq.recon import unit as u; f = u.UnitReconstruction.step_loss\n"
              "def p(self, b, s):\n    r, l = f(self, b, s)\n    return (r * float('nan'), l * float('nan')) "
              "if self.key == 'pack_02' and s >= 3 else (r, l)\n"
              "u.UnitReconstruction.step_loss = p\nfrom packptq.cli import main; sys.argv[0] = 'packptq'; main()")
    args = [*TINY, "packing=block", "recon.iters=5", f"hydra.run.dir={w / 'run'}"]
    r = run([sys.executable, "-c", inject, *args], env(cache), w)
    return {"cmd": "packptq <tiny> packing=block recon.iters=5  (loss of pack_02 made NaN from step 3)", **r}


def _interrupt(w: Path, cache: Path, sig: int) -> dict:
    run_dir = w / "run"
    args = [*TINY, "packing=block", "recon.iters=400", f"hydra.run.dir={run_dir}"]
    t0 = time.time()
    p = subprocess.Popen(packptq(*args), env=env(cache), cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    while not (run_dir / "unit_01.pt").exists() and p.poll() is None and time.time() - t0 < 900:
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    r = observe(p.returncode, out, err, time.time() - t0)
    r["resume_line"] = next((ln.strip()[:200] for ln in (out + err).splitlines() if "hydra.run.dir=" in ln), "")
    r["units_kept"] = sorted(x.name for x in run_dir.glob("unit_*.pt"))
    r["tmp_left"] = tmp_files(run_dir)
    return r


def case_sigint(w: Path, cache: Path) -> dict:
    return {"cmd": "packptq <tiny> packing=block recon.iters=400; SIGINT after unit_01.pt",
            **_interrupt(w, cache, signal.SIGINT)}


def case_sigterm(w: Path, cache: Path) -> dict:
    return {"cmd": "packptq <tiny> packing=block recon.iters=400; SIGTERM after unit_01.pt",
            **_interrupt(w, cache, signal.SIGTERM)}


def case_two_writers(w: Path, cache: Path) -> dict:
    run_dir = w / "run"
    args = [*TINY, "packing=block", "recon.iters=100", f"hydra.run.dir={run_dir}"]
    t0 = time.time()
    procs = [subprocess.Popen(packptq(*args), env=env(cache), cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    obs = [observe(p.returncode, o, e, time.time() - t0) for p, (o, e) in zip(procs, outs)]
    both_recon = sum("quant top-1" in o.lower() or "W4A4" in o for o, _ in outs)
    return {"cmd": "two `packptq <tiny> packing=block recon.iters=100` on one hydra.run.dir at once",
            "rc": [o["rc"] for o in obs], "error_lines": sum(o["error_lines"] for o in obs),
            "first_error": next((o["first_error"] for o in obs if o["first_error"]), ""),
            "traceback": any(o["traceback"] for o in obs), "s": obs[-1]["s"], "finished": both_recon}


def case_disk_full(w: Path, cache: Path) -> dict:
    mnt = w / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], check=True)
    try:
        run_dir = mnt / "run"
        args = [*TINY, "packing=block", "recon.iters=5", f"hydra.run.dir={run_dir}"]
        r = run(packptq(*args), env(cache), w)
        r["tmp_left"] = tmp_files(run_dir)
        r["units_kept"] = sorted(x.name for x in run_dir.glob("unit_*.pt"))
        r["names_path"] = str(run_dir) in r["first_error"] or str(run_dir) in r["tail"]
    finally:
        subprocess.run(["umount", str(mnt)])
    return {"cmd": "packptq <tiny> packing=block recon.iters=5 hydra.run.dir=<200 KB tmpfs>", **r}


def case_refused_resume(w: Path, cache: Path) -> dict:
    run_dir = w / "run"
    args = [*TINY, "packing=block", "recon.iters=5", f"hydra.run.dir={run_dir}"]
    first = run(packptq(*args), env(cache), w)
    assert first["rc"] == 0, first
    a, b = run_dir / "unit_03.pt", run_dir / "unit_04.pt"
    a.rename(run_dir / "swap"), b.rename(a), (run_dir / "swap").rename(b)
    before = snapshot(run_dir)
    r = run(packptq(*args), env(cache), w)
    after = snapshot(run_dir)
    r["changed"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return {"cmd": "finished run, unit_03.pt/unit_04.pt swapped, same command again", **r}


CASES = {k[5:]: v for k, v in globals().items() if k.startswith("case_")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--work", default="/tmp/fault_probe")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"  # shared by the cases that need a trained FP model (trained once)
    work.mkdir(parents=True)
    for name in args.only or CASES:
        w = work / name
        w.mkdir()
        try:
            res = CASES[name](w, cache)
        except Exception as exc:  # noqa: BLE001  (the probe reports, it does not stop)
            res = {"probe_error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"case": name, **res}), flush=True)


if __name__ == "__main__":
    main()
