"""Stand-ins for the SLURM commands submitit calls (sbatch, srun, sacct, squeue, scancel,
scontrol), for tests: ``install(bin_dir, state_dir)`` writes them as one Python script under
several names. ``sbatch`` answers at once and runs the job (each task of an array) in a detached
process on this machine, with the SLURM_* variables a job sees; ``srun`` runs its command with
``--output``/``--error`` patterns expanded; ``sacct`` reports PENDING, RUNNING, then the state
the job ended in; ``scontrol requeue`` marks a task to be run again after it exits.

Preemption: when the environment has ``STANDIN_PREEMPT_GLOB`` (a glob pattern), ``srun`` sends
the job the signal SLURM sends before preemption or the time limit (SIGUSR2, submitit's
default) once the first file matching the pattern appears, once per state directory."""
from __future__ import annotations

import os
import stat
from pathlib import Path

SCRIPT = r'''#!__PYTHON__
import glob, os, re, shlex, signal, subprocess, sys, time
from pathlib import Path

STATE = Path(__STATE__)
NAME = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]


def log(msg):
    with open(STATE / "calls.log", "a") as f:
        f.write(msg + "\n")


def set_state(jid, state):
    (STATE / f"state_{jid}").write_text(state)


def sbatch(path):
    text = Path(path).read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))
    counter = STATE / "counter"
    job = int(counter.read_text()) + 1 if counter.exists() else 1000
    counter.write_text(str(job))
    array = flags.get("array")
    tasks = list(range(int(array.split("%")[0].split("-")[1]) + 1)) if array else [None]
    for task in tasks:
        set_state(f"{job}_{task}" if task is not None else str(job), "PENDING")
    log(f"sbatch {job} tasks={len(tasks)} job-name={flags.get('job-name')}")
    subprocess.Popen([sys.executable, sys.argv[0], "--run", path, str(job), *map(str, tasks if array else [])],
                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     stdin=subprocess.DEVNULL, env={**os.environ, "STANDIN_CPUS": flags.get("cpus-per-task", "1")})
    print(f"Submitted batch job {job}")


def run(path, job, tasks):
    text = Path(path).read_text()
    folder = shlex.split(text.strip().splitlines()[-1])[-1]
    for task in tasks or [None]:
        jid = f"{job}_{task}" if task is not None else job
        pickle = Path(folder.replace("%j", jid)) / f"{jid}_submitted.pkl"
        for _ in range(600):  # submitit moves the pickle in place after sbatch returns
            if pickle.exists():
                break
            time.sleep(0.1)
        env = {**os.environ, "SLURM_JOB_ID": str(int(job) + (int(task) + 1 if task is not None else 0)),
               "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
               "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_CPUS_PER_TASK": os.environ["STANDIN_CPUS"], "STANDIN_JID": jid}
        if task is not None:
            env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=task)
        while True:
            set_state(jid, "RUNNING")
            code = subprocess.call(["bash", path], env=env)
            marker = STATE / f"requeue_{jid}"
            if marker.exists():
                marker.unlink()
                log(f"requeued {jid}")
                continue
            log(f"finished {jid} code={code}")  # logged before the state submitit polls
            set_state(jid, "COMPLETED" if code == 0 else "FAILED")
            break


def srun(args):
    out = err = None
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            value = args.pop(0)
            for key, var in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"),
                             ("%j", "SLURM_JOB_ID"), ("%t", "SLURM_PROCID")):
                value = value.replace(key, os.environ.get(var, "0"))
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            if flag == "--output":
                out = value
            else:
                err = value
    fout = open(out, "a") if out else None
    ferr = open(err, "a") if err else fout
    child = subprocess.Popen(args, stdout=fout, stderr=ferr)
    pattern = os.environ.get("STANDIN_PREEMPT_GLOB")
    done = STATE / "preempted"
    while child.poll() is None:
        if pattern and not done.exists() and glob.glob(pattern):
            done.write_text(os.environ.get("STANDIN_JID", ""))
            log(f"signal {os.environ.get('STANDIN_JID')}")
            child.send_signal(signal.SIGUSR2)
        time.sleep(0.2)
    sys.exit(child.returncode)


def sacct(args):
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for f in sorted(STATE.glob("state_*")):
        jid = f.name[len("state_"):]
        if jid.split("_")[0] in ids:
            print(f"{jid}|{f.read_text()}|localhost")


if ARGS[:1] == ["--run"]:
    run(ARGS[1], ARGS[2], ARGS[3:])
elif NAME == "sbatch":
    sbatch(ARGS[-1])
elif NAME == "srun":
    srun(list(ARGS))
elif NAME == "sacct":
    sacct(ARGS)
elif NAME == "scontrol" and ARGS[:1] == ["requeue"]:
    log(f"scontrol requeue {ARGS[1]}")
    (STATE / f"requeue_{ARGS[1]}").write_text("")
elif NAME in ("squeue", "scancel", "scontrol"):
    log(f"{NAME} {' '.join(ARGS)}")
else:
    sys.exit(f"slurm stand-in: unknown command {NAME} {ARGS}")
'''

COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol")


def install(bin_dir: Path, state_dir: Path, python: str) -> None:
    """Write the stand-ins into ``bin_dir``; they keep their state in ``state_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    text = SCRIPT.replace("__PYTHON__", python).replace("__STATE__", repr(str(state_dir)))
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
