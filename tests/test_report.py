"""packptq.report on a fake result set, and the sweep launchers that produce such sets."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from packptq import report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (model, packing policy, mp policy, w_bits, bits per pack or None) -> top-1 per seed 0, 1, 2
RUNS = {
    ("resnet18", "hessian", "knapsack", 3, (2, 3, 4)): [60.0, 62.0, 67.0],
    ("resnet18", "block", None, 4, None): [70.0, 71.0, 75.0],
    ("deit_tiny", "hessian", "knapsack", 3, (3, 3, 4)): [50.0, 55.0, 51.5],
}


def result(model="resnet18", policy="hessian", mp=None, w_bits=4, bits=None, seed=0,
           top1=70.0) -> dict:
    """A results.json record following docs/architecture.md (top-1 in percent)."""
    packs = [["layer1.0"], ["layer1.1", "layer2.0"], ["layer2.1"]]
    return {
        "model": model, "data": "cifar10", "seed": seed,
        "quant": {"w_bits": w_bits, "a_bits": 4, "first_last_bits": 8,
                  "act_placement": "input", "attn_prob": "uniform", "ln_reparam": False},
        "packing": {"policy": policy, "loss": "kl"},
        "mp": {"policy": mp, "avg_bits": w_bits if mp else None},
        "fp_top1": 90.0, "rtn_top1": 10.0, "quant_top1": top1, "agreement": 80.0,
        "w_bits_avg": float(w_bits), "a_bits_avg": 4.0, "size_bytes": 1000 * w_bits,
        "units": packs, "packs": packs, "bits": bits, "scores": [1.0, 0.5, 2.0],
        "time_s": {"scores": 1.5, "recon": 10.0, "eval": 0.5},
        "calib_fingerprint": "abc", "overrides": [f"seed={seed}", f"model={model}"],
        "config": {}, "run_dir": "/somewhere/else",
    }


def write(path: Path, record: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(record))
    return path


@pytest.fixture
def multirun(tmp_path) -> Path:
    """multirun/DATE/TIME/N/results.json, one sweep per seed."""
    root = tmp_path / "multirun"
    for seed in range(3):
        sweep = root / "2025-01-01" / f"12-00-0{seed}"
        for job, ((model, policy, mp, w_bits, bits), top1) in enumerate(RUNS.items()):
            bits = list(bits) if bits else None
            write(sweep / str(job), result(model, policy, mp, w_bits, bits, seed, top1[seed]))
    return root


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


# --------------------------------------------------------------------------- collect
def test_collect_flattens_every_run(multirun):
    df = report.collect([multirun])
    assert len(df) == 9
    row = df[(df.model == "resnet18") & (df.packing_policy == "hessian") & (df.seed == 1)].iloc[0]
    assert (row.data, row.w_bits, row.a_bits, row.act_placement) == ("cifar10", 3, 4, "input")
    assert (row.first_last_bits, row.attn_prob, row.ln_reparam) == (8, "uniform", False)
    assert (row.packing_loss, row.mp_policy, row.mp_avg_bits) == ("kl", "knapsack", 3)
    assert row.quant_top1 == 62.0 and row.size_bytes == 3000
    assert row.n_packs == 3 and row.time_total_s == 12.0
    assert json.loads(row.bits) == [2, 3, 4] and json.loads(row.pack_sizes) == [1, 2, 1]
    assert row.overrides == "seed=1 model=resnet18"
    # run_dir is the run's place relative to the directory given, not the path recorded when
    # it was written: reports made anywhere from the same runs agree
    assert row.run_dir == "2025-01-01/12-00-01/0"
    assert df[df.packing_policy == "block"].bits.isna().all()


def test_collect_counts_a_file_once_and_accepts_files(multirun):
    one = multirun / "2025-01-01" / "12-00-00" / "0" / "results.json"
    df = report.collect([multirun, multirun / "2025-01-01", one])
    assert len(df) == 9
    assert len(report.collect([one])) == 1


def test_missing_keys_become_nan(tmp_path, multirun):
    write(tmp_path / "old", {"model": "resnet18", "seed": 0, "quant_top1": 50.0})
    df = report.collect([multirun, tmp_path / "old"])
    old = df[df.run_dir == "old"].iloc[0]  # two paths given: each run is named under its path
    assert old.quant_top1 == 50.0
    for column in ("w_bits", "packing_policy", "mp_avg_bits", "fp_top1", "n_packs",
                   "time_total_s", "bits"):
        assert pd.isna(old[column]), column
    summary = report.summarize(df)
    assert len(summary) == 4  # the old run is a group of its own, not dropped
    out = report.write_report(df, tmp_path / "report")
    assert "50.00" in out["summary.md"].read_text()


def test_unreadable_results_are_skipped(tmp_path, multirun):
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "results.json").write_text('{"model": ')
    with pytest.warns(UserWarning, match="skipping unreadable"):
        df = report.collect([multirun, tmp_path / "killed"])
    assert len(df) == 9


def test_no_results_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no readable results.json"):
        report.collect([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no such"):
        report.collect([tmp_path / "missing"])


# --------------------------------------------------------------------------- summarize
def test_summary_is_mean_and_sample_std_over_seeds(multirun):
    summary = report.summarize(report.collect([multirun]))
    assert len(summary) == len(RUNS)
    assert not {"seed", "run_dir"} & set(summary.columns)
    assert (summary.n_seeds == 3).all()
    for (model, policy, *_), top1 in RUNS.items():
        row = summary[(summary.model == model) & (summary.packing_policy == policy)].iloc[0]
        assert row.quant_top1_mean == pytest.approx(statistics.mean(top1))
        assert row.quant_top1_std == pytest.approx(statistics.stdev(top1))
        assert row.fp_top1_std == pytest.approx(0.0)
        assert row.time_total_s_mean == pytest.approx(12.0)


def test_repeated_seed_in_a_group_warns(tmp_path):
    write(tmp_path / "a", result(seed=0, top1=70.0))
    write(tmp_path / "b", result(seed=0, top1=60.0))
    with pytest.warns(UserWarning, match="repeated seeds"):
        report.summarize(report.collect([tmp_path]))


def test_markdown_cells(multirun):
    md = report.to_markdown(report.summarize(report.collect([multirun])))
    # constant config columns move to one line above the table
    assert md.startswith("All rows: data=cifar10, a_bits=4,")
    header = md.splitlines()[2]
    assert "| model |" in header and "top-1 (%)" in header and "| data |" not in header
    top1 = RUNS[("resnet18", "hessian", "knapsack", 3, (2, 3, 4))]
    mean, std = statistics.mean(top1), statistics.stdev(top1)
    assert f"{mean:.2f} ± {std:.2f}" in md
    assert md.count("\n|") == 2 + len(RUNS)


def test_single_seed_shows_mean_only(tmp_path):
    write(tmp_path / "a", result(top1=70.0))
    md = report.to_markdown(report.summarize(report.collect([tmp_path])))
    assert "| 70.00 |" in md and "±" not in md


def test_rows_split_by_every_varying_override(tmp_path):
    """A data.calib_size=16,64 sweep over two seeds: two rows (not one with a repeated-seed
    warning), calib sizes printed as integers, --by chooses the rows, titles name the setting,
    and a per-unit reconstruction loss plot."""
    import warnings

    for calib, seed, top1 in ((16, 0, 60.0), (16, 1, 62.0), (64, 0, 70.0), (64, 1, 71.5)):
        rec = result(seed=seed, top1=top1)
        rec["overrides"] = [f"data.calib_size={calib}", f"seed={seed}", "threads=1", "recon.iters=20"]
        rec["recon_loss"] = {"prefix": [1.0, 0.5 / calib], "pack0": [2.0, 1.0 / calib]}
        write(tmp_path / f"c{calib}s{seed}", rec)
    df = report.collect([tmp_path])
    assert report.override_columns(df) == ["data.calib_size", "recon.iters"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "repeated seeds" warning
        summary = report.summarize(df)
    assert list(summary["data.calib_size"]) == [16, 64] and list(summary["n_seeds"]) == [2, 2]
    assert list(summary["quant_top1_mean"]) == pytest.approx([61.0, 70.75])
    md = report.to_markdown(summary)
    assert "| data.calib_size |" in md and "| 16 |" in md and "| 64 |" in md and "16.0" not in md
    assert "recon.iters=20" in md  # constant: moved above the table
    assert report._fmt_value(0.123456789) == "0.1235" and report._fmt_value(64.0) == "64"

    assert len(report.summarize(df, by=["model"])) == 1
    with pytest.raises(KeyError, match="nope"):
        report.summarize(df, by=["nope"])

    out = report.write_report(df, tmp_path / "report")
    assert {"top1_by_setting.png", "recon_loss.png"} <= set(out)
    fig = report.plot_top1_by_setting(summary)
    (ax,) = fig.axes
    assert ax.get_title() == "resnet18 on cifar10, W4A4\ntop-1 of each setting, mean ± std over seeds"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["data.calib_size=16", "data.calib_size=64"]
    fig = report.plot_recon_loss(report.load_report(tmp_path / "report")[0])
    (ax,) = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["data.calib_size=16 (2 runs)",
                                                                   "data.calib_size=64 (2 runs)"]
    heights = sorted({round(float(seg[0][1]), 8) for c in ax.collections for seg in c.get_segments()})
    assert heights == pytest.approx(sorted([0.5 / 16, 1 / 16, 0.5 / 64, 1 / 64]))

    assert report.main([str(tmp_path), "--out", str(tmp_path / "r2"), "--by", "model"]) == 0
    assert len(pd.read_csv(tmp_path / "r2" / "summary.csv")) == 1  # one row
    with pytest.raises(SystemExit, match="nope"):
        report.main([str(tmp_path), "--out", str(tmp_path / "r3"), "--by", "nope"])


# --------------------------------------------------------------------------- files
def test_write_report_files(multirun, tmp_path):
    df = report.collect([multirun])
    out = report.write_report(df, tmp_path / "report")
    assert set(out) == {"results.csv", "summary.csv", "summary.md", "top1_vs_bits.png",
                        "top1_by_setting.png", "bits_per_pack.png"}
    results, summary = report.load_report(tmp_path / "report")
    assert len(results) == 9 and len(summary) == len(RUNS)
    assert "±" in out["summary.md"].read_text()
    assert is_png(out["top1_vs_bits.png"]) and is_png(out["bits_per_pack.png"])
    # the notebook plots from the CSVs: lists must survive the round trip
    fig = report.plot_bits_per_pack(results)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # two distinct allocations, each shared by three seeds
    bars = {}
    for ax in panels:
        assert ax.get_title().endswith(" hessian / knapsack (3 runs)"), ax.get_title()
        assert ax.get_xlabel() == "block" and ax.get_ylabel() == "weight bits"
        model = ax.get_title().split()[0]
        bars[model] = [(p.get_x(), p.get_width(), p.get_height()) for p in ax.patches]
        (avg,) = [line.get_ydata()[0] for line in ax.get_lines()]
        assert avg == pytest.approx(3.0)  # w_bits_avg of the three runs
    # bits per pack; bars span the pack sizes [1, 2, 1] read back from the CSV
    assert bars == {"resnet18": [(0, 1, 2), (1, 2, 3), (3, 1, 4)],
                    "deit_tiny": [(0, 1, 3), (1, 2, 3), (3, 1, 4)]}

    fig = report.plot_top1_vs_bits(summary)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "average weight bits (achieved)" and ax.get_ylabel() == "top-1 (%)"
    series = {}
    for c in ax.containers:  # one errorbar series per model / packing / mp policy
        line = c.lines[0]
        series[c.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    want = {(m, p): ([float(w)], [statistics.mean(t)]) for (m, p, _, w, _), t in RUNS.items()}
    assert len(series) == len(want) == 3
    for (model, policy), (xs, ys) in want.items():
        (label,) = [k for k in series if model in k and policy in k]
        assert series[label][0] == pytest.approx(xs) and series[label][1] == pytest.approx(ys), label
    fp_lines = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in fp_lines] == [[90.0, 90.0]]  # one FP line for both models


def test_bits_per_pack_is_skipped_without_allocations(tmp_path, multirun):
    report.write_report(report.collect([multirun]), tmp_path / "report")
    write(tmp_path / "a", result(bits=None))
    out = report.write_report(report.collect([tmp_path / "a"]), tmp_path / "report")
    assert "bits_per_pack.png" not in out and is_png(out["top1_vs_bits.png"])
    assert not (tmp_path / "report" / "bits_per_pack.png").exists()  # no stale plot


def test_bits_per_pack_caps_panels(tmp_path):
    for i in range(15):
        write(tmp_path / str(i), result(bits=[2, 3, 4 + i]))
    fig = report.plot_bits_per_pack(report.collect([tmp_path]), max_panels=6)
    assert sum(ax.get_visible() for ax in fig.axes) == 6
    assert "6 of 15" in fig._suptitle.get_text()


def test_cli_main(multirun, tmp_path, capsys):
    assert report.main([str(multirun)]) == 0
    printed = capsys.readouterr().out
    assert "±" in printed and "9 runs" in printed
    assert is_png(multirun / "report" / "top1_vs_bits.png")
    report.main([str(multirun), "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "summary.md").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no readable results.json"):
        report.main([str(tmp_path / "empty")])


# --------------------------------------------------------------------------- records and --check
def test_records_regenerate_the_report_and_check_names_each_mismatch(multirun, tmp_path, capsys):
    out = tmp_path / "results" / "sweep"
    assert report.main([str(multirun), "--out", str(out)]) == 0
    records = report.read_records(out / "records.json")
    assert len(records) == 9 and records[0]["run"] == "2025-01-01/12-00-00/0"
    assert "config" in records[0] and "scores" in records[0]
    # the report made from the records alone equals the one made from the run directories
    problems, folders = report.check(tmp_path / "results")
    assert problems == [] and folders == [out]
    assert report.main(["--check", str(tmp_path / "results")]) == 0

    md = (out / "summary.md").read_text()
    (out / "summary.md").write_text(md.replace("63.00", "64.00", 1))  # an edit by hand
    (out / "notes.md").write_text("typed\n")
    (out / "recon_loss.png").unlink(missing_ok=True)
    (out / "top1_vs_bits.png").unlink()
    problems, _ = report.check(tmp_path / "results")
    assert len(problems) == 3, problems
    assert any("summary.md: differs" in p and "64.00" in p for p in problems)
    assert any("notes.md: not made by packptq-report" in p for p in problems)
    assert any("top1_vs_bits.png: missing" in p for p in problems)
    capsys.readouterr()
    assert report.main(["--check", str(tmp_path / "results")]) == 1
    assert "summary.md" in capsys.readouterr().err
    # regenerating a folder from its own records repairs the tables it makes
    assert report.main([str(out), "--out", str(out)]) == 0
    (out / "notes.md").unlink()
    assert report.check(tmp_path / "results")[0] == []


def test_code_version_names_the_checkout():
    from packptq.artifacts import code_version

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    version = code_version()
    assert version["version"] and version["commit"].split("+")[0] == head.stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    assert version["commit"].endswith("+dirty") == bool(dirty)


def test_committed_results_pass_check():
    """Every report folder under experiments/results/ is what packptq-report makes from the
    records committed beside it, and the experiments README names no folder that is missing."""
    problems, folders = report.check(REPO / "experiments" / "results")
    assert problems == [] and folders
    readme = (REPO / "experiments" / "README.md").read_text()
    assert "TODO" not in readme and "Source:" not in readme
    table = readme.split("### Report folders")[1].split("###")[0]
    named = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `results/")}
    assert named and all((REPO / "experiments" / n / "records.json").is_file() for n in named), named


def test_settings_header_is_read_from_the_records(tmp_path):
    for lr, seed, val in ((3e-3, 0, 97.0), (3e-3, 1, 97.5), (3e-2, 0, 98.0), (3e-2, 1, 98.5)):
        rec = result(seed=seed, top1=90.0 + seed)
        rec["quant"]["range_norm"] = 2.4
        rec.update(val_top1=val, val_size=500, calib_size=256, packptq={"version": "0", "commit": "abcdef1234567890"})
        rec["config"] = {"recon": {"w_lr": lr, "iters": 100}}
        rec["overrides"] = [f"recon.w_lr={lr}", f"seed={seed}"]
        write(tmp_path / "runs" / f"lr{lr}s{seed}", rec)
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| range-search error norm | 2.4 |" in md
    assert "| rounding learning rate (`recon.w_lr`) | 0.003, 0.03 (varies: choose on the validation column" in md
    assert "| iterations per unit (`recon.iters`) | 100 |" in md and "| seeds | 0, 1 |" in md
    assert "| first/last layer bits (`quant.first_last_bits`) | 8 |" in md and "packptq commit abcdef123456" in md
    assert "val top-1 (%)" in md and "97.25 ± 0.35" in md  # validation top-1 beside test top-1


def test_group_choices_do_not_repeat_config_columns(tmp_path):
    for seed in (0, 1):
        rec = result(policy="block", seed=seed)
        rec["overrides"] = ["packing=block", "packing.loss=kl", "mp.policy=none", "quant=w4a4",
                            "quant.a_bits=4", "data.calib_size=64", f"seed={seed}"]
        write(tmp_path / f"s{seed}", rec)
    df = report.collect([tmp_path])
    assert report.override_columns(df) == ["data.calib_size"]
    assert "packing" not in df.columns and "quant" not in df.columns


def test_failed_unfinished_and_unstarted_jobs_are_listed(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write(sweep / "0", result(seed=0))
    for job, error in (("1", "Traceback ...\nConfigError: recon.drop_prob=2.0 must be in [0, 1]\n"), ("2", None)):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n- threads=1\n")
        if error:
            (sweep / job / "error.txt").write_text(error)
    (sweep / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      seed: 0,1,2,3\n"
                                         "  overrides:\n    task: [threads=1]\n")
    got = report.gather([sweep])
    assert [f["run"] for f in got.failed] == ["1", "2", "sweep"]
    assert got.failed[0] == {"run": "1", "overrides": "seed=1",
                             "error": "ConfigError: recon.drop_prob=2.0 must be in [0, 1]"}
    assert got.failed[1]["error"].startswith("unfinished") and "1 of the 4 jobs" in got.failed[2]["error"]
    assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Failed or missing jobs (3)" in md and "`1` (`seed=1`): ConfigError: recon.drop_prob" in md
    assert "job 1 left no result" in capsys.readouterr().err
    assert report.check(tmp_path)[0] == []  # the failures are part of the records


def test_reference_numbers_beside_matching_rows(multirun, tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text("model,data,w_bits,a_bits,method,mp,top1,source\n"
                   "resnet18,cifar10,3,4,Pack-PTQ,knapsack,60.5,Paper Table 2\n"
                   "resnet18,cifar10,4,4,QDrop,none,70.0,QDrop paper\n"
                   "resnet18,cifar10,4,4,BRECQ,none,99.0,BRECQ paper\n"
                   "deit_tiny,cifar10,3,4,Pack-PTQ,none,,\n")  # a template cell: skipped
    report.main([str(multirun), "--out", str(tmp_path / "out"), "--reference", str(ref)])
    summary = pd.read_csv(tmp_path / "out" / "summary.csv", keep_default_na=False)
    rows = {(r.model, r.packing_policy): r for r in summary.itertuples()}
    hessian, block = rows[("resnet18", "hessian")], rows[("resnet18", "block")]
    assert (hessian.ref_top1, hessian.ref_diff, hessian.ref_source) == ("60.50", "+2.50", "Pack-PTQ: Paper Table 2")
    assert (block.ref_top1, block.ref_diff) == ("70.00", "+2.00")  # 72.0 mean; BRECQ needs drop_prob=1
    assert rows[("deit_tiny", "hessian")].ref_top1 == ""
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| reference top-1 (%) | top-1 - reference | reference source |" in md
    assert report.check(tmp_path)[0] == []  # the reference rows travel in records.json

    bad = tmp_path / "bad.csv"
    bad.write_text("model,data,w_bits,a_bits,method,top1,source\n")
    with pytest.raises(SystemExit, match="lacks column.*mp"):
        report.main([str(multirun), "--reference", str(bad)])
    bad.write_text("model,data,w_bits,a_bits,method,mp,top1,source\nresnet18,cifar10,3,4,hessian,none,61,\n")
    with pytest.raises(SystemExit, match="line 2.*source"):
        report.main([str(multirun), "--reference", str(bad)])
    template = report.read_reference(REPO / "experiments" / "reference" / "paper_template.csv")
    assert template == []  # the template ships no number


def test_recon_loss_is_drawn_across_the_blocks_of_each_unit(tmp_path):
    """Runs whose packs differ: each unit's loss spans its own blocks, not a unit number."""
    for seed, packs in ((0, [["b0"], ["b1", "b2"]]), (1, [["b0", "b1"], ["b2"]])):
        rec = result(seed=seed)
        rec.update(units=[["stem"], *packs, ["fc"]], packs=packs,
                   unit_keys=["prefix_00", "pack_00", "pack_01", "suffix_00"],
                   recon_loss={"prefix_00": [1, 0.1], "pack_00": [1, 0.2 + seed], "pack_01": [1, 0.3 + seed],
                               "suffix_00": [1, 0.4]})
        rec["overrides"] = [f"seed={seed}", f"packing.seed={seed}"]
        write(tmp_path / f"s{seed}", rec)
    fig = report.plot_recon_loss(report.collect([tmp_path]))
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stem", "b0", "b1", "b2", "fc"]
    spans = sorted((round(float(seg[0][1]), 3), float(seg[0][0]) + 0.4, float(seg[1][0]) - 0.4)
                   for c in ax.collections for seg in c.get_segments())
    assert (0.3, 2.0, 3.0) in spans and (1.2, 1.0, 2.0) in spans  # seed 0 pack b1,b2; seed 1 pack b0,b1
    assert (1.3, 3.0, 3.0) in spans and (0.1, 0.0, 0.0) in spans


def test_titles_read_as_the_settings(multirun):
    df = report.collect([multirun])
    assert report.plot_title(df) == "deit_tiny, resnet18 on cifar10, W3A4, W4A4"
    fig = report.plot_top1_vs_bits(report.summarize(df))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert len(labels) == len(set(labels)) == 3 and all(lab.startswith("model=") for lab in labels)


# --------------------------------------------------------------------------- sweeps
# The launcher configs (conf/hydra/launcher/) produce the multirun layout collect() reads;
# they are checked against a small primary config so that they do not depend on the rest of
# conf/, and against conf/config.yaml when it exists.
APP = '''
import json, os
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    record = {"model": "toy", "seed": cfg.seed, "quant_top1": 50.0 + cfg.seed,
              "threads": cfg.threads, "overrides": list(HydraConfig.get().overrides.task),
              "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}}
    (out / "results.json").write_text(json.dumps(record))

if __name__ == "__main__":
    main()
'''


@pytest.fixture
def app(tmp_path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "hydra", conf / "hydra")
    # `threads` as conf/config.yaml has it: resolved inside the job, after env_set applies.
    (conf / "config.yaml").write_text(
        "defaults:\n  - _self_\nseed: 0\nthreads: ${oc.env:PACKPTQ_THREADS,null}\n")
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def compose_launcher(conf: Path, overrides: list[str]) -> dict:
    """``{"launcher": hydra.launcher, "env_set": hydra.job.env_set}``, resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from packptq.schemas import register

    register()  # <group>/base schemas, which the repository's config needs
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        # Not all of cfg.hydra resolves outside a run (hydra.job.num), so only these.
        return {"launcher": OmegaConf.to_container(cfg.hydra.launcher, resolve=True),
                "env_set": OmegaConf.to_container(cfg.hydra.job.env_set, resolve=True)}


@pytest.mark.slow
def test_local_sweep_runs_and_is_collected(app):
    """A real two-job sweep through submitit's local executor."""
    env = {k: v for k, v in os.environ.items() if k != "PACKPTQ_THREADS"}
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", "hydra/launcher=local", "seed=0,1"],
        cwd=app, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(app.glob("multirun/*/*/*/results.json"))
    assert len(files) == 2
    record = json.loads(files[0].read_text())
    assert record["env"] == {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    assert int(record["threads"]) == 1  # oc.env gives a string; a typed schema casts it
    df = report.collect([app / "multirun"])
    assert sorted(df.seed) == [0, 1] and sorted(df.overrides) == ["seed=0", "seed=1"]


def test_local_launcher_config(app):
    composed = compose_launcher(app / "conf", ["hydra/launcher=local",
                                               "hydra.launcher.timeout_min=5"])
    launcher = composed["launcher"]
    assert launcher["_target_"].endswith("LocalLauncher")
    assert (launcher["cpus_per_task"], launcher["tasks_per_node"]) == (1, 1)
    assert launcher["timeout_min"] == 5
    assert composed["env_set"]["OMP_NUM_THREADS"] == "1"
    assert composed["env_set"]["PACKPTQ_THREADS"] == "1"  # read by `threads` in the config


def test_slurm_launcher_reads_site_file(app, tmp_path, monkeypatch):
    import submitit
    from hydra.errors import ConfigCompositionException
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    launcher = compose_launcher(app / "conf", ["hydra/launcher=slurm"])["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] is None
    for key in ("account", "gpus_per_node", "timeout_min", "mem_gb", "cpus_per_task",
                "array_parallelism"):
        assert key in launcher

    (app / "conf" / "local").mkdir()
    site = app / "conf" / "local" / "slurm.yaml"
    site.write_text("partition: gpu\naccount: proj1\nadditional_parameters:\n  qos: high\n")
    launcher = compose_launcher(app / "conf", ["hydra/launcher=slurm",
                                               "hydra.launcher.mem_gb=8"])["launcher"]
    assert (launcher["partition"], launcher["account"], launcher["mem_gb"]) == ("gpu", "proj1", 8)

    # The sbatch script submitit would submit, built from these parameters the way the
    # plugin does (schema keys as they are, the rest prefixed with the executor name).
    # SlurmExecutor only checks that srun exists.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --qos=high",
                 "#SBATCH --mem=8GB", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --job-name=packptq", "#SBATCH --signal=USR2@120",
                 "export PACKPTQ_THREADS=$SLURM_CPUS_PER_TASK OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK "
                 "MKL_NUM_THREADS=$SLURM_CPUS_PER_TASK"):
        assert line in script

    site.write_text("partiton: gpu\n")  # a typo is an error, not a silent no-op
    with pytest.raises(ConfigCompositionException, match="partiton"):
        compose_launcher(app / "conf", ["hydra/launcher=slurm"])


@pytest.mark.skipif(not (REPO / "conf" / "config.yaml").is_file(), reason="no conf/config.yaml")
@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launchers_compose_with_repo_config(launcher):
    composed = compose_launcher(REPO / "conf", [f"hydra/launcher={launcher}"])
    assert composed["launcher"]["_target_"].lower().endswith(f"{launcher}launcher")
