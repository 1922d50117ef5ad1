"""The workflows around a run: the config tree shipped inside the package, W&B runs that
record what the job did (start with the job, exit code, one run per run directory, sweep
groups), and SLURM submission through stand-in SLURM commands (tests/slurm_standin.py)."""
from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, tiny_cfg


def test_configs_ship_inside_the_package():
    conf = importlib.resources.files("packptq") / "conf"
    assert (conf / "config.yaml").is_file()
    for group in ("model/resnet18.yaml", "data/mnist5k.yaml", "hydra/launcher/slurm.yaml",
                  "experiment/quickstart.yaml"):
        assert (conf / group).is_file(), group
    from packptq import cli

    assert Path(cli.CONF_DIR) == Path(str(conf))


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
    cfg = tiny_cfg(run_dir, "logger=wandb", "model.train_epochs=1", f"cache_dir={tmp_path / 'cache'}")

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
