"""The workflows around a run: the config tree shipped inside the package, W&B runs that
record what the job did (start with the job, exit code, one run per run directory, sweep
groups), and SLURM submission through stand-in SLURM commands (tests/slurm_standin.py)."""
from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, tiny_cfg


def test_configs_ship_inside_the_package():
    conf = importlib.resources.files("packptq") / "conf"
    assert (conf / "config.yaml").is_file()
    for group in ("model/resnet18.yaml", "data/mnist5k.yaml", "hydra/launcher/slurm.yaml",
                  "experiment/quickstart.yaml"):
        assert (conf / group).is_file(), group
    from packptq import api, cli

    assert Path(cli.CONF_DIR) == Path(api.CONF_DIR) == Path(str(conf))  # one tree for both, inside the package


def test_sweep_group_names_the_experiment_and_swept_keys():
    from packptq.cli import sweep_group

    assert sweep_group(["-m", "experiment=quickstart", "data.calib_size=16,64", "seed=0,1",
                        "hydra/launcher=parallel", "threads=1"]) == "quickstart:data.calib_size,seed"
    assert sweep_group(["--multirun", "recon.iters=range(2,4)"]) == "default:recon.iters"
    assert sweep_group(["seed=0,1"]) is None  # not a multirun


def wandb_records(blob: bytes):
    """The serialized records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-style log blocks of 32 KiB, each record chunk with a 7-byte header (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    assert blob[:4] == b":W&B", blob[:7]
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(blob):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(blob[pos + 4:pos + 6], "little"), blob[pos + 6]
        chunk = blob[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            yield parts
            parts = b""


def read_wandb_run(run_dir: Path) -> list[dict]:
    """The offline W&B runs of ``run_dir`` (oldest first), read back from their ``.wandb``
    record files: ``{"id", "exit_code", "history_keys", "summary"}``."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = {"id": None, "exit_code": None, "history_keys": set(), "summary": {}}
        for data in wandb_records(path.read_bytes()):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run" and rec.run.run_id:
                out["id"] = rec.run.run_id
            elif kind == "exit":
                out["exit_code"] = rec.exit.exit_code
            elif kind == "history":
                out["history_keys"].update(item.key or "/".join(item.nested_key) for item in rec.history.item)
            elif kind == "summary":
                for item in rec.summary.update:
                    out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        runs.append(out)
    return runs


@pytest.mark.slow
def test_wandb_failed_run_has_exit_code_and_resume_continues_it(tmp_path, monkeypatch):
    """A run failing in reconstruction is finished in W&B with exit code 1, after its FP
    training curve was logged; running the same run directory again continues that W&B run
    (same id) and finishes it with exit code 0 and the results in its summary."""
    from packptq import cli
    from packptq.recon import sequence

    monkeypatch.setenv("WANDB_MODE", "offline")
    # a cache of its own: the FP model is trained here, with the logger
    monkeypatch.setenv("PACKPTQ_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(run_dir, "logger=wandb", "model.train_epochs=2", f"cache_dir={tmp_path / 'cache'}")

    def boom(self, *args, **kwargs):
        raise RuntimeError("reconstruction diverged")

    with monkeypatch.context() as m:
        m.setattr(sequence.ReconSequence, "run", boom)
        with pytest.raises(RuntimeError, match="diverged"):
            cli.run_with_logging(cfg, ["seed=0"])
    (failed,) = read_wandb_run(run_dir)
    assert failed["id"] == cli.wandb_run_id(str(run_dir))
    assert failed["exit_code"] == 1
    assert {"fp/train_loss_step", "fp/train_loss_epoch"} <= failed["history_keys"]  # the FP trainer had the logger
    assert "eval/fp_top1" in failed["history_keys"]

    results = cli.run_with_logging(cfg, ["seed=0"])
    first, resumed = read_wandb_run(run_dir)
    assert first == failed and resumed["id"] == failed["id"]
    assert resumed["exit_code"] == 0
    assert resumed["summary"]["quant_top1"] == pytest.approx(results["quant_top1"])
    assert "time/recon_s" in resumed["summary"]
    assert any(k.startswith("recon/") for k in resumed["history_keys"])  # per-unit losses


# --------------------------------------------------------------------------- SLURM
def slurm_sweep(tmp_path, monkeypatch, preempt_glob: str, *overrides: str):
    """``python -m packptq -m hydra/launcher=slurm ...`` (TINY setting) through the stand-in
    SLURM commands; returns (completed process, sweep dir, stand-in state dir)."""
    import slurm_standin

    state = tmp_path / "slurm"
    slurm_standin.install(tmp_path / "bin", state, sys.executable)
    sweep = tmp_path / "multirun"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "STANDIN_PREEMPT_GLOB": preempt_glob,
           "PACKPTQ_CONFIG_DIR": str(tmp_path / "user-config")}
    site = tmp_path / "user-config" / "local"
    site.mkdir(parents=True)
    (site / "slurm.yaml").write_text("partition: standin\naccount: proj1\n")
    cmd = [sys.executable, "-m", "packptq", "-m", "hydra/launcher=slurm", *TINY,
           f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={sweep}/.submitit/%j",
           "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    wait_for_standin(state)
    return proc, sweep, state


def wait_for_standin(state: Path, limit_s: float = 120.0) -> None:
    """submitit collects a task once its result file exists, so the sweep can return while the
    detached stand-in is still waiting for that task's process to exit: wait until every task
    the stand-in submitted has logged ``finished`` (or ``limit_s`` passed; the caller's
    assertions then say what is missing)."""
    log = state / "calls.log"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        calls = log.read_text().splitlines() if log.exists() else []
        submitted = sum(int(c.split("tasks=")[1].split()[0]) for c in calls if c.startswith("sbatch "))
        if sum(c.startswith("finished ") for c in calls) >= submitted:
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_slurm_sweep_submits_requeues_preempted_job_and_collects(tmp_path, monkeypatch):
    """Submit -> run -> collect through sbatch/srun/sacct stand-ins: a two-job array named
    packptq with the user config's site values; job 0 is signalled once it has written rtn.json
    (preemption), requeued by submitit (scontrol requeue), resumes in the same run directory and
    continues the same W&B run; the sweep ends with both results collected."""
    from packptq import cli, report

    proc, sweep, state = slurm_sweep(tmp_path, monkeypatch, str(tmp_path / "multirun" / "0" / "rtn.json"),
                                     "logger=wandb", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = (state / "calls.log").read_text().splitlines()
    assert calls[0].startswith("sbatch 1000 tasks=2 job-name=packptq")
    assert "scontrol requeue 1000_0" in calls and "requeued 1000_0" in calls
    assert {"finished 1000_0 code=0", "finished 1000_1 code=0"} <= set(calls)
    script = (sweep / ".submitit" / "1000" / "1000_submission.sh").read_text()
    for line in ("#SBATCH --partition=standin", "#SBATCH --account=proj1", "#SBATCH --job-name=packptq",
                 "export PACKPTQ_THREADS=$SLURM_CPUS_PER_TASK OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK "
                 "MKL_NUM_THREADS=$SLURM_CPUS_PER_TASK"):
        assert line in script
    log = (sweep / ".submitit" / "1000_0" / "1000_0_0_log.err").read_text()
    assert "this job is preempted" in log
    out = (sweep / ".submitit" / "1000_0" / "1000_0_0_log.out").read_text()
    assert "resuming run dir" in out  # the requeued job found the first attempt's artifacts

    df = report.collect([sweep])
    assert sorted(df.seed) == [0, 1]
    assert sorted(Path(p).name for p in df.run_dir) == ["0", "1"]  # no third run directory
    attempts = read_wandb_run(sweep / "0")
    assert len(attempts) == 2 and {a["id"] for a in attempts} == {cli.wandb_run_id(str(sweep / "0"))}
    assert attempts[-1]["exit_code"] == 0 and "quant_top1" in attempts[-1]["summary"]
    assert len(read_wandb_run(sweep / "1")) == 1


@pytest.mark.slow
def test_slurm_job_at_time_limit_is_requeued_up_to_max_num_timeout(tmp_path, monkeypatch):
    """With timeout_min=1 submitit takes SLURM's warning signal as the time limit: the job is
    requeued while max_num_timeout allows (here once) and then finishes."""
    proc, sweep, state = slurm_sweep(tmp_path, monkeypatch, str(tmp_path / "multirun" / "0" / "rtn.json"),
                                     "logger=none", "seed=0", "hydra.launcher.timeout_min=1",
                                     "hydra.launcher.max_num_timeout=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = (state / "calls.log").read_text().splitlines()
    assert "requeued 1000" in calls or "requeued 1000_0" in calls, calls
    err = next((sweep / ".submitit").glob("1000*/*_log.err")).read_text()
    assert "this job is timed-out" in err
    assert (sweep / "0" / "results.json").is_file()


@pytest.mark.slow
def test_progress_weighted_by_steps_and_console_saved(tmp_path, trained_tiny):
    """With progress on, the reconstruction bar counts optimisation steps (its total is the sum
    of every unit's steps, not the unit count), FP-training and calibration bars show too, and
    the console output is also in the run directory's packptq.log, in lines."""
    from packptq import cli

    run_dir = tmp_path / "run"
    results = cli.run_with_logging(tiny_cfg(run_dir, "progress=true"), ["progress=true"])
    steps = sum(len(json.loads((run_dir / f"unit_{i:02d}.json").read_text())["loss"])
                for i in range(len(results["unit_keys"])))
    assert steps > len(results["unit_keys"])
    log = (run_dir / "packptq.log").read_text()
    assert "\r" not in log  # lines only: a bar is kept as the line it ends with
    assert f"reconstruct {len(results['unit_keys'])} units: 100%" in log
    assert f"| {steps}/{steps} [" in log
    assert "calibrate" in log
    assert "quantized top-1" in log  # the printed results table


def test_help_schema_defaults_match_the_schemas():
    """``packptq --help`` reads each schema's defaults from its source instead of importing it
    (no torch): they equal the dataclasses' own, for every registered group."""
    from omegaconf import OmegaConf

    from packptq.cli import SCHEMA_SOURCES, schema_defaults
    from packptq.schemas import SCHEMAS

    assert set(SCHEMA_SOURCES) == set(SCHEMAS)
    for group, schema in SCHEMAS.items():
        assert SCHEMA_SOURCES[group][1] == schema.__name__
        assert schema_defaults(group) == OmegaConf.to_container(OmegaConf.structured(schema)), group


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["main", "report_main", "export_main"])
def test_help_of_each_command_imports_no_torch(entry, tmp_path):
    """``--help`` of ``packptq``, ``packptq-report`` and ``packptq-export`` prints its usage
    without importing torch, Lightning or timm (the command modules import them when needed)."""
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules)))\n"
            f"sys.argv = ['prog', '--help']\nfrom packptq import cli\ncli.{entry}()")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HEAVY []" in p.stdout and ("usage:" in p.stdout or "== Config ==" in p.stdout), p.stdout[-2000:]
