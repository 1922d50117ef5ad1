"""The fault catalogue: bad inputs and faults a user meets, each of which must end in one clear
line (a ConfigError in process, ``packptq: error: ...`` and exit code 2 on the command line),
never in a traceback, and never in a ``results.json`` that claims success.

Every case is a row of a table below, tagged with where it stops: ``before`` (before FP
training or calibration: the ``no_heavy_compute`` guard fails the test if either is reached)
or ``after`` (the fault only shows once data flows through the network). ``CATALOGUE`` counts
them; experiments/results/faults.md records the totals."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_cfg, tiny_overrides
from packptq import calibration, fp, pipeline
from packptq.config import ConfigError, RunFailure


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg




def refuse(run_dir: Path, overrides, match: str) -> str:
    """Run the tiny setting with ``overrides`` in ``run_dir``; it must raise one ConfigError line
    matching ``match`` and leave no results.json."""
    had = (run_dir / "results.json").read_bytes() if (run_dir / "results.json").exists() else None
    with pytest.raises(ConfigError, match=match) as exc:
        pipeline.run(tiny_cfg(run_dir, *overrides))
    now = (run_dir / "results.json").read_bytes() if (run_dir / "results.json").exists() else None
    assert now == had, "results.json written by a failed run"
    return one_line(exc.value)


# -- files the cases need ------------------------------------------------------------------------
def _tiny_state_dict() -> dict:
    from packptq.config import typed
    from packptq.zoo.build import ModelConfig, build_model

    cfg = tiny_cfg("/tmp/unused")
    mcfg = typed(ModelConfig, cfg.model, "model")
    return build_model(mcfg, {"num_classes": 10, "in_chans": 1, "img_size": 16}).state_dict()


def _file(tmp_path: Path, kind: str) -> str:
    if kind == "NAN_CKPT":
        sd = _tiny_state_dict()
        sd["conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(sd, tmp_path / "nan.pt")
        return str(tmp_path / "nan.pt")
    if kind == "PARTIAL_CKPT":  # a state dict missing a whole stage
        sd = {k: v for k, v in _tiny_state_dict().items() if not k.startswith("layer4.")}
        torch.save(sd, tmp_path / "partial.pt")
        return str(tmp_path / "partial.pt")
    if kind == "EXTRA_CKPT":  # another architecture's extra tensors
        sd = {**_tiny_state_dict(), "aux_head.weight": torch.zeros(10, 64)}
        torch.save(sd, tmp_path / "extra.pt")
        return str(tmp_path / "extra.pt")
    if kind == "NHWC_NPZ":
        x = np.random.default_rng(0).normal(size=(60, 16, 16, 1)).astype(np.float32)
        np.savez(tmp_path / "nhwc.npz", x=x, y=np.arange(60) % 10)
        return str(tmp_path / "nhwc.npz")
    if kind == "ONE_CLASS_NPZ":  # every label 0
        x = np.random.default_rng(0).normal(size=(300, 1, 16, 16)).astype(np.float32)
        np.savez(tmp_path / "one.npz", x=x, y=np.zeros(300, np.int64))
        return str(tmp_path / "one.npz")
    if kind == "FILE":  # a regular file: nothing can be created below it
        (tmp_path / "afile").write_text("x")
        return str(tmp_path / "afile")
    raise KeyError(kind)


def _expand(overrides, tmp_path: Path):
    out = []
    for o in overrides:
        for kind in ("NAN_CKPT", "PARTIAL_CKPT", "EXTRA_CKPT", "NHWC_NPZ", "ONE_CLASS_NPZ", "FILE"):
            if kind in o:
                o = o.replace(kind, _file(tmp_path, kind))
        out.append(o)
    return out


# -- 1. inputs refused before any compute ----------------------------------------------------------
BEFORE = [
    # FP phase: configurations that would train zero optimiser steps
    (["model.train_epochs=0"], r"model.train_epochs must be >= 1"),
    (["model.train_batch_size=5000"], r"no optimiser step: the training split has \d+ samples"),
    (["data.n_test=-200"], r"data.n_test must be >= 1, got -200"),
    # the validation rows leave 47 training samples, fewer than one batch of 64
    (["data.calib_size=16", "data.val_size=1350", "model.train_batch_size=64"],
     r"training split has 47 samples after data.val_size=1350 validation rows are held out, fewer than "
     r"model.train_batch_size=64"),
    (["model.train_lr=0"], r"model.train_lr must be a finite number > 0"),
    (["model.train_wd=-1"], r"model.train_wd must be"),
    (["cache_dir=FILE/cache"], r"FP cache folder .* is not writable"),
    # checkpoints
    (["model.checkpoint=NAN_CKPT"], r"non-finite values \(NaN or inf\) in 1 tensor\(s\): \['conv1.weight'\]"),
    (["model.checkpoint=PARTIAL_CKPT"], r"\d+ missing keys \['layer4\..*model.strict=false"),
    (["model.checkpoint=EXTRA_CKPT"], r"1 unexpected keys \['aux_head.weight'\]"),
    # values out of range
    (["recon.w_lr=-0.003"], r"recon.w_lr must be a finite number > 0, got -0.003"),
    (["recon.a_lr=0"], r"recon.a_lr must be a finite number > 0"),
    (["recon.reg_lambda=-1"], r"recon.reg_lambda must be"),
    (["recon.warmup=2"], r"recon.warmup=2.0 must be in \[0, 1\]"),
    (["recon.log_every=0"], r"recon.log_every=0 must be >= 1"),
    (["seed=-1"], r"seed must be an integer in \[0, 2\*\*63\), got -1"),
    (["threads=0"], r"threads must be a positive integer, got 0"),
    (["threads=two"], r"threads must be a positive integer, got 'two'"),
    (["data.seed=-5"], r"data.seed must be in \[0, 2\*\*63\)"),
    (["data.calib_size=0"], r"data.calib_size must be >= 1"),
    (["data.batch_size=0"], r"data.batch_size must be >= 1"),
    (["data.num_workers=-1"], r"data.num_workers must be >= 0"),
    # unknown registry names: one line listing the known ones
    (["data.name=cifar99"], r"unknown data.name 'cifar99'; known: .*digits.*mnist5k"),
    (["model.family=resnot"], r"unknown model.family 'resnot'; known: auto, .*resnet"),
    # data layouts
    (["data=npz", "data.path=NHWC_NPZ"], r"looks channels-last \[N, H, W, C\]"),
    (["data=npz", "data.path=ONE_CLASS_NPZ", "data.n_test=50"], r"every training label is 0; a classifier needs at "
                                                                 r"least two classes"),
    # directories
    (["run_dir=FILE/run"], r"run directory .* is not writable"),
]


@pytest.mark.parametrize("overrides,match", BEFORE, ids=[" ".join(o) for o, _ in BEFORE])
def test_refused_before_compute(overrides, match, tmp_path, no_heavy_compute):
    run_dir = tmp_path / "run"
    refuse(run_dir, _expand(overrides, tmp_path), match)
    assert not (run_dir / "fp.json").exists()


def test_corrupt_calibration_image_is_one_line_before_training(tmp_path, no_heavy_compute):
    from test_data import write_image_tree

    root = write_image_tree(tmp_path / "imgs", n_train=3, n_val=1)
    bad = sorted((root / "train" / "dog").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a truncated PNG
    refuse(tmp_path / "run", ["data=imagefolder", f"data.path={root}", "data.calib_size=9", "data.num_workers=0",
                              "data.img_size=16", "model.train_batch_size=4"],
           rf"image {bad} cannot be decoded")


# -- 2. resume: refusals name what changed and change nothing ---------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, trained_tiny):
    """A finished block-wise tiny run (10 units); tests copy it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    res = pipeline.run(tiny_cfg(run_dir, "packing=block", "recon.iters=5"))
    return run_dir, res


def _copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run[0], dst)
    return dst


def _mtimes(d: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.iterdir() if p.is_file()}


RESUME_BEFORE = [
    (["quant.w_bits=3"], r"different config: quant.w_bits \(4 -> 3\)", False),
    (["quant.w_bits=3"], r"fp.json from another run", True),  # fingerprint.json deleted: the artifacts refuse
    (["trainer.precision=bf16-mixed"], r"trainer.precision \(32-true -> bf16-mixed\)", False),
    (["data.calib_size=32"], r"data.calib_size \(64 -> 32\)", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,match,drop_fp", RESUME_BEFORE, ids=[f"{o[0]}-drop{d}" for o, _, d in RESUME_BEFORE])
def test_resume_refusal_names_the_change_and_changes_nothing(overrides, match, drop_fp, finished_run, tmp_path,
                                                             no_heavy_compute):
    run_dir = _copy(finished_run, tmp_path)
    if drop_fp:
        (run_dir / "fingerprint.json").unlink()
    before = _mtimes(run_dir)
    refuse(run_dir, ["packing=block", "recon.iters=5", *overrides], match)
    assert _mtimes(run_dir) == before  # nothing written, nothing touched


@pytest.mark.slow
def test_resume_ignores_what_does_not_change_results(finished_run, tmp_path, monkeypatch):
    """data.num_workers and the logger stay outside the fingerprint: the run resumes without
    training; the results carry the first process's times plus this one's, and the fitted losses."""
    run_dir = _copy(finished_run, tmp_path)
    monkeypatch.setattr(fp, "_train", lambda *a, **k: pytest.fail("trained an FP model"))
    first = json.loads((run_dir / "results.json").read_text())
    res = pipeline.run(tiny_cfg(run_dir, "packing=block", "recon.iters=5", "data.num_workers=0", "logger=none"))
    assert res["quant_top1"] == first["quant_top1"] and res["recon_loss"] == first["recon_loss"]
    assert res["recon_loss"] and all(res["time_s"][k] >= first["time_s"][k] for k in first["time_s"])
    assert res["time_s"]["recon"] >= first["time_s"]["recon"] > 0
    assert res["time_s"]["calibrate"] > first["time_s"]["calibrate"]  # this process calibrated again


@pytest.mark.slow
def test_swapped_unit_files_are_refused(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    a, b = run_dir / "unit_03.pt", run_dir / "unit_04.pt"
    tmp = run_dir / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    before = _mtimes(run_dir)
    msg = refuse(run_dir, ["packing=block", "recon.iters=5"], r"unit_03.pt holds unit pack_03 .* not pack_02")
    assert "mixes unit files" in msg
    assert _mtimes(run_dir) == before  # refused after the guard passed: times.json is not rewritten either


@pytest.mark.slow
def test_unit_file_of_another_run_is_refused(finished_run, tmp_path, trained_tiny):
    """Another run (other seed) in another directory; its unit_02.pt copied in: refused by the
    fingerprint it records, even with fingerprint.json gone."""
    other = tmp_path / "other"
    pipeline.run(tiny_cfg(other, "packing=block", "recon.iters=5", "seed=1"))
    run_dir = _copy(finished_run, tmp_path)
    for name in ("unit_02.pt",):
        shutil.copy(other / name, run_dir / name)
    for p in run_dir.glob("unit_0[3-9].*"):
        p.unlink()
    (run_dir / "results.json").unlink()
    (run_dir / "fingerprint.json").unlink()
    refuse(run_dir, ["packing=block", "recon.iters=5"], r"unit_02.pt was produced by another run")


# -- 3. faults during compute ------------------------------------------------------------------------
@pytest.mark.slow
def test_nonfinite_unit_loss_stops_naming_unit_and_step(tmp_path, trained_tiny, monkeypatch):
    from packptq.recon import unit as unit_mod

    step_loss = unit_mod.UnitReconstruction.step_loss

    def poisoned(self, batch, step):
        rec, loss = step_loss(self, batch, step)
        if self.key == "pack_02" and step >= 3:
            rec, loss = rec * float("nan"), loss * float("nan")
        return rec, loss

    monkeypatch.setattr(unit_mod.UnitReconstruction, "step_loss", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailure, match=r"unit pack_02 diverged: loss nan at step 3 of 5") as exc:
        pipeline.run(tiny_cfg(run_dir, "packing=block", "recon.iters=5"))
    assert not isinstance(exc.value, ConfigError)  # a failure of the run, not bad input (exit 1, not 2)
    one_line(exc.value)
    assert not (run_dir / "results.json").exists()
    assert sorted(p.name for p in run_dir.glob("unit_*.pt")) == ["unit_00.pt", "unit_01.pt", "unit_02.pt"]


@pytest.mark.slow
def test_full_disk_names_the_path_and_leaves_no_temp_file(finished_run, tmp_path, monkeypatch):
    """The disk fills while unit_05.pt is written: a RunFailure naming that file and the way
    on; no ``.unit_05.pt.<pid>.tmp`` left; the units before it kept for the resume."""
    import errno

    from packptq import artifacts

    run_dir = _copy(finished_run, tmp_path)
    for p in [*run_dir.glob("unit_0[5-9].*"), run_dir / "results.json"]:
        p.unlink()
    save = artifacts.torch.save

    def full(obj, f):
        if Path(f.name).name.startswith(".unit_05.pt."):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f)

    monkeypatch.setattr(artifacts.torch, "save", full)
    with pytest.raises(RunFailure) as exc:
        pipeline.run(tiny_cfg(run_dir, "packing=block", "recon.iters=5"))
    msg = one_line(exc.value)
    assert f"cannot write {run_dir / 'unit_05.pt'} (No space left on device); free space" in msg
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "unit_05.pt").exists()
    assert sorted(p.name for p in run_dir.glob("unit_*.pt")) == [f"unit_{i:02d}.pt" for i in range(5)]


def test_atomic_write_error_keeps_the_old_file(tmp_path):
    from packptq.artifacts import save_pt

    save_pt(tmp_path / "a.pt", {"v": torch.ones(2)})
    with pytest.raises(RunFailure, match=rf"cannot write {tmp_path / 'a.pt'} .*run the same command again"):
        save_pt(tmp_path / "a.pt", {"v": _Unpicklable()})
    assert torch.load(tmp_path / "a.pt")["v"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


class _Unpicklable:
    def __reduce__(self):
        raise OSError(28, "No space left on device")


# -- 3b. one writer per run directory ----------------------------------------------------------------
def test_second_writer_of_a_run_directory_is_refused(tmp_path):
    """Another process holds the run directory's lock (here: another open file description of
    the lock file, which flock treats like another process): refused at once, one line naming
    the holder, nothing written; after it lets go, the same directory is usable."""
    import fcntl

    from packptq import cli
    from packptq.artifacts import LOCK_FILE, writer_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = open(run_dir / LOCK_FILE, "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    with pytest.raises(ConfigError) as exc:
        cli.run_with_logging(tiny_cfg(run_dir), [])
    assert f"run directory {run_dir} is in use by another packptq process (pid {os.getpid()})" in one_line(exc.value)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    holder.close()
    with writer_lock(run_dir), writer_lock(run_dir):  # free again; re-entrant within a process
        pass


def test_fp_model_near_chance_is_refused_before_quantizing(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "obtain", lambda model, *a, **k: model.eval())  # the untrained network
    calls = []
    monkeypatch.setattr(calibration, "calibrate_twins", lambda *a, **k: calls.append(1))
    refuse(tmp_path / "run", [], r"FP model's top-1 is .* near chance \(10.00% for 10 classes\)")
    assert not calls


def test_near_chance_given_weights_warn(packptq_log):
    fp.check_not_chance(9.0, 10, trained_here=False, where=None)
    (rec,) = packptq_log.records
    assert rec.levelname == "WARNING" and rec.getMessage().startswith("the FP model's top-1 is 9.00%")
    fp.check_not_chance(50.0, 10, trained_here=True, where="x")  # well above chance: silent
    with pytest.raises(ConfigError, match="delete x to retrain"):
        fp.check_not_chance(9.0, 10, trained_here=True, where="x")


# -- 4. the FP cache: content key, settings that matter, one training per entry -----------------
def _npz_dm(path: Path, seed: int = 0, **kw):
    from packptq.data import build_datamodule

    return build_datamodule({"name": "npz", "path": str(path), "n_test": 10, "calib_size": 8, "seed": 0,
                             "calib_seed": seed, **kw})


def test_fp_cache_key_follows_content_not_location_or_eval_batch(tmp_path):
    from packptq.config import typed
    from packptq.zoo.build import ModelConfig

    mcfg = typed(ModelConfig, {"name": "resnet18"}, "model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    key = lambda dm, **t: fp.cache_path(mcfg, dm, tmp_path, t).name  # noqa: E731
    k0 = key(_npz_dm(tmp_path / "a.npz"))
    shutil.copy(tmp_path / "a.npz", tmp_path / "moved.npz")
    assert key(_npz_dm(tmp_path / "moved.npz")) == k0  # a moved file keeps its model
    assert key(_npz_dm(tmp_path / "a.npz", batch_size=7, num_workers=3)) == k0  # serving settings
    assert key(_npz_dm(tmp_path / "a.npz"), precision="bf16-mixed") != k0  # training precision
    x[0, 0, 0, 0] += 1.0
    np.savez(tmp_path / "a.npz", x=x, y=y)  # rewritten in place
    assert key(_npz_dm(tmp_path / "a.npz")) != k0


def test_npz_calib_array_draw_follows_the_run_seed(tmp_path):
    x = np.zeros((60, 1, 4, 4), np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(60) % 3, train=np.arange(50), test=np.arange(50, 60),
             calib=np.arange(0, 40, dtype=np.int64))
    draws = {tuple(_npz_dm(tmp_path / "c.npz", seed=s, n_test=10).calib_indices().tolist()) for s in range(3)}
    assert len(draws) == 3


def test_concurrent_jobs_train_one_fp_model_once(tmp_path, trained_tiny, monkeypatch):
    """Two jobs asking for the same missing cache entry at once: one trains (under the lock),
    the other waits and loads what it wrote."""
    model0, dm, cfg = trained_tiny
    from packptq.config import typed
    from packptq.zoo.build import ModelConfig

    mcfg = typed(ModelConfig, cfg.model, "model")
    trained = []
    training, release = threading.Event(), threading.Event()
    at_lock = threading.Semaphore(0)  # one release per job that reaches the cache entry's lock
    real_locked = fp._locked

    def locked(path):
        at_lock.release()
        return real_locked(path)

    def fake_train(model, *a, **k):  # holds the lock until the second job waits on it
        trained.append(threading.get_ident())
        training.set()
        assert release.wait(120)
        model.load_state_dict(model0.state_dict())

    monkeypatch.setattr(fp, "_train", fake_train)
    monkeypatch.setattr(fp, "_locked", locked)
    import copy

    out = {}

    def job(i):
        out[i] = fp.train_or_load(copy.deepcopy(model0), dm, mcfg, dm.cfg, tmp_path, {})

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    threads[0].start()
    assert training.wait(120)  # the first job trains, holding the lock
    threads[1].start()
    assert at_lock.acquire(timeout=120) and at_lock.acquire(timeout=120)  # the second found no entry: it waits
    release.set()
    [t.join() for t in threads]
    assert len(trained) == 1 and out[0][1] == out[1][1]
    assert sorted(p.name for p in (tmp_path / "fp").iterdir() if not p.name.endswith(".lock")) == \
        [Path(out[0][1]).name]  # no temp file left behind


# -- 5. the command line: exit code 2, one line, no traceback -----------------------------------------
def _cli(tmp_path, *args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PACKPTQ_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "packptq", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def _tiny_args(run_dir, *extra):
    return [o for o in tiny_overrides(run_dir, *extra) if not o.startswith("run_dir=")] + [f"hydra.run.dir={run_dir}"]


def test_unknown_config_choice_is_one_line_naming_the_known_ones(tmp_path):
    """``model=resnet999`` (no conf/model/resnet999.yaml) is refused before Hydra composes, with
    the known choices and the timm route; sweeps are checked name by name; files in the user
    config directory count; keys that are not config groups, Hydra's nested groups, deletions
    and sweep syntax other than comma lists are left alone."""
    from packptq.cli import unknown_choice

    msg = unknown_choice(["seed=0", "model=resnet999"])
    assert msg.startswith("unknown model 'resnet999'; known: ") and "resnet18" in msg and "base," not in msg
    assert msg.endswith("any timm model: model=timm model.name=resnet999")
    assert unknown_choice(["-m", "quant=w4a4,w9a9"]) == "unknown quant 'w9a9'; known: w2a4, w3a3, w4a4, w6a6, w8a8"
    assert unknown_choice(["+experiment=nope"]).startswith("unknown experiment 'nope'")
    ok = ["model=resnet18", "quant=w4a4,w3a3", "mp=none", "logger=null", "hydra/launcher=slurm", "~model",
          "model.name=anything", "seed=0,1", "quant=glob(*)", "recon.iters=range(2,4)", "experiment=quickstart"]
    assert unknown_choice(ok) is None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: resnet18\n")
    assert unknown_choice(["model=mine"]) is not None
    assert unknown_choice(["model=mine"], [str(tmp_path)]) is None


def test_hydra_composition_errors_are_one_line(monkeypatch):
    """What Hydra reports in several lines (exit 1) is one line before the run: a misspelt key,
    bad override syntax, a nested group that does not exist; a SLURM sweep where SLURM is not
    installed. Sweeps are composed by their first value; a sweep over a good key passes."""
    import shutil as sh

    import packptq.schemas  # noqa: F401
    from packptq.cli import compose_error

    assert compose_error(["recon.iter=5"]) == ("unknown config key 'recon.iter' (misspelt?); `packptq --cfg job` "
                                               "prints every key; to add a new one use +recon.iter=5")
    assert compose_error(["-m", "seed=0,1", "model.nme=x"]).startswith("unknown config key 'model.nme'")
    assert compose_error(["quant.w_bits=[4"]).startswith("cannot parse the override 'quant.w_bits=[4': ")
    msg = compose_error(["hydra/launcher=nope"])
    assert "Could not find 'hydra/launcher/nope'" in msg and "Available options in 'hydra/launcher': basic," in msg
    assert compose_error(["recon.iters=abc"]).endswith("Value 'abc' of type 'str' could not be converted to Integer")
    assert compose_error(["-m", "seed=0,1", "recon.iters=range(2,4)", "quant=glob(*)"]) is None
    monkeypatch.setattr(sh, "which", lambda name: None)
    slurm = compose_error(["-m", "hydra/launcher=slurm", "seed=0,1"])
    assert slurm.startswith("hydra/launcher=slurm needs SLURM, and sbatch/srun are not on PATH here")
    assert compose_error(["hydra/launcher=slurm", "seed=0"]) is None  # a single run launches nothing


def test_pretrained_weights_offline_read_the_hub_cache_only(tmp_path, monkeypatch):
    """``model.pretrained=true`` with the hub unreachable: timm runs with huggingface_hub in
    offline mode (the local cache only, no minute of retries) and the failure is one line."""
    import timm
    from huggingface_hub import constants

    from packptq.zoo import build

    seen = []
    create = timm.create_model

    def spy(*a, **k):
        seen.append(constants.HF_HUB_OFFLINE)
        return create(*a, **k)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(build, "_hub_reachable", lambda: False)
    monkeypatch.setattr(timm, "create_model", spy)
    was = constants.HF_HUB_OFFLINE
    with pytest.raises(ConfigError, match=r"model.pretrained=true: timm could not get resnet18's pretrained weights "
                                          r"\(.*\); offline, give model.checkpoint=PATH") as exc:
        build.build_timm(build.ModelConfig(name="resnet18", pretrained=True), {"num_classes": 10, "in_chans": 3})
    one_line(exc.value)
    assert seen == [True] and constants.HF_HUB_OFFLINE == was


CLI = [
    (["seed=-1"], "seed must be an integer"),
    (["data.name=cifar99"], "unknown data.name 'cifar99'; known:"),
    (["hydra.run.dir=FILE/run"], "run directory"),
    (["recon.iter=5"], "unknown config key 'recon.iter' (misspelt?)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra,match", CLI, ids=[c[0][0] for c in CLI])
def test_cli_bad_input_is_one_line_exit_2(extra, match, tmp_path):
    run_dir = tmp_path / "run"
    p = _cli(tmp_path, *_tiny_args(run_dir), *_expand(extra, tmp_path))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("packptq: error: ")]
    assert len(errors) == 1 and match in errors[0], p.stderr[-2000:]
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_cli_traceback_only_with_hydra_full_error(tmp_path):
    p = _cli(tmp_path, *_tiny_args(tmp_path / "run"), "seed=-1", env_extra={"HYDRA_FULL_ERROR": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr and "seed must be an integer" in p.stderr


@pytest.mark.slow
def test_cli_refused_resume_keeps_the_old_hydra_config(tmp_path):
    """An existing run directory whose fingerprint differs: the refusal is one line and the
    old run's .hydra/*.yaml are as they were (Hydra writes them before packptq runs)."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("old: config\n")
    (run_dir / "fingerprint.json").write_text(json.dumps({"config": "0", "calibration": "0", "items": {}}))
    p = _cli(tmp_path, *_tiny_args(run_dir))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "holds a run with a different config" in p.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "old: config\n"


@pytest.mark.slow
def test_cli_sweep_with_one_bad_job_runs_the_others(tmp_path, trained_tiny):
    sweep = tmp_path / "sweep"
    args = [o for o in tiny_overrides(tmp_path / "unused") if not o.startswith("run_dir=")]
    p = _cli(tmp_path, "-m", *args, "packing=none", "seed=0,-1", f"hydra.sweep.dir={sweep}")
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("packptq: error")]
    assert len(errors) == 2 and "(job 1: " in errors[0] and "seed must be an integer" in errors[0]
    assert "1 sweep job(s) failed" in errors[1]
    assert (sweep / "0" / "results.json").exists() and not (sweep / "1" / "results.json").exists()
    assert "seed must be" in (sweep / "1" / "error.txt").read_text()


def _poisoned_main(unit_key: str, action: str) -> str:
    """``python -c`` source: the packptq command line with ``action`` (an expression of
    ``r, l``) applied from step 3 of unit ``unit_key``'s reconstruction."""
    return ("import os, signal, sys; from packptq.recon import unit as u; f = u.UnitReconstruction.step_loss\n"
            "def p(self, b, s):\n    r, l = f(self, b, s)\n"
            f"    return ({action}) if self.key == {unit_key!r} and s >= 3 else (r, l)\n"
            "u.UnitReconstruction.step_loss = p\nfrom packptq.cli import main; main()")


def _cli_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PACKPTQ_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.slow
def test_cli_divergence_is_a_failure_exit_1(tmp_path, trained_tiny):
    """A unit whose loss turns NaN: one line, exit status 1 (the run failed; the input was
    fine), the finished units kept."""
    run_dir = tmp_path / "run"
    poison = _poisoned_main("pack_02", "r * float('nan'), l * float('nan')")
    p = subprocess.run([sys.executable, "-c", poison, *_tiny_args(run_dir, "packing=block", "recon.iters=5")],
                       env=_cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("packptq: error: ")]
    assert len(errors) == 1 and "unit pack_02 diverged: loss nan at step 3 of 5" in errors[0]
    assert sorted(x.name for x in run_dir.glob("unit_*.pt")) == ["unit_00.pt", "unit_01.pt", "unit_02.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_cli_interrupt_prints_the_resume_command(sig, tmp_path, trained_tiny):
    """Ctrl-C or SIGTERM in the middle of a unit's reconstruction (the process signals itself
    at step 3 of pack_02, inside Lightning's fit): exit status 128 + signal number, one line
    with the command that resumes (the same overrides and ``hydra.run.dir``), no traceback,
    no temporary file; that command finishes the run from the units kept."""
    import shlex
    import signal

    run_dir = tmp_path / "run"
    args = _tiny_args(run_dir, "packing=block", "recon.iters=5")
    signum = getattr(signal, sig)
    p = subprocess.run([sys.executable, "-c", _poisoned_main("pack_02", f"os.kill(os.getpid(), {int(signum)}) or (r, l)"),
                        *args], env=_cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 128 + signum and "Traceback" not in p.stdout + p.stderr, p.stderr[-2000:]
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("packptq: interrupted")]
    assert len(line) == 1 and line[0].startswith(f"packptq: interrupted ({sig}); finished units are kept; resume with: ")
    again = shlex.split(line[0].split("resume with: ", 1)[1])
    assert again[0] == "packptq" and again[-1] == f"hydra.run.dir={run_dir}" and again[1:-1] == args[:-1]
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "results.json").exists()
    assert sorted(x.name for x in run_dir.glob("unit_*.pt")) == ["unit_00.pt", "unit_01.pt", "unit_02.pt"]
    kept = (run_dir / "unit_00.pt").read_bytes()
    p = subprocess.run([sys.executable, "-m", "packptq", *again[1:]], env=_cli_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run_dir / "unit_00.pt").read_bytes() == kept and (run_dir / "results.json").exists()


@pytest.mark.slow
def test_cli_slurm_sweep_without_slurm_is_one_line(tmp_path):
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not (Path(d) / "srun").exists() and not (Path(d) / "sbatch").exists())
    args = [o for o in tiny_overrides(tmp_path / "unused") if not o.startswith("run_dir=")]
    p = _cli(tmp_path, "-m", "hydra/launcher=slurm", *args, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             env_extra={"PATH": path})
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("packptq: error: ")]
    assert len(errors) == 1 and "hydra/launcher=slurm needs SLURM" in errors[0]
    assert not (tmp_path / "sweep").exists()


#: the faulty inputs of this module, by where they stop (experiments/results/faults.md); the other
#: tests here check behaviour that is not a fault (what the FP cache and the fingerprint follow)
CATALOGUE = {
    # BEFORE, the corrupt image, RESUME_BEFORE, CLI, the refused resume on the command line, the
    # bad job of a sweep (refused before its own compute); Hydra composition errors (a misspelt
    # key, one in a sweep, bad syntax, an unknown nested group, a wrong type, SLURM without
    # SLURM), pretrained weights offline, a second writer of a run directory, the SLURM sweep on
    # the command line
    "before": len(BEFORE) + 1 + len(RESUME_BEFORE) + len(CLI) + 1 + 1 + 6 + 1 + 1 + 1,
    # swapped unit files, a unit file of another run, a non-finite unit loss (after calibration
    # and the finished units), an FP model near chance (after its evaluation, before quantizing);
    # the non-finite loss on the command line (exit 1), SIGINT and SIGTERM during a unit, a full
    # disk while a unit file is written
    "after": 4 + 1 + 2 + 1,
}


def test_catalogue_counts():
    assert CATALOGUE == {"before": 47, "after": 8}
