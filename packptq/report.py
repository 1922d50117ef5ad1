"""Collect ``results.json`` files into tables and plots.

``collect`` flattens every run found under some run or multirun directories into one row per
run; ``summarize`` averages the metrics over seeds; ``write_report`` writes the CSVs, a
markdown table and the plots. ``packptq-report DIR [DIR...] [--out OUT]`` does all three.

Units are those of ``results.json`` throughout: top-1 and agreement in percent, bits per
element, sizes in bytes (MB in the markdown table), times in seconds.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import tempfile
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend

RESULTS_FILE = "results.json"
#: the compact per-run records a report folder is made from (see ``write_records``)
RECORDS_FILE = "records.json"
#: written by a failed sweep job into its directory (its one-line reason; packptq.cli)
ERROR_FILE = "error.txt"
#: the tables ``write_report`` makes; ``check`` regenerates these and compares them
TABLES = ("summary.md", "summary.csv", "results.csv")
PLOTS = ("top1_vs_bits.png", "top1_by_setting.png", "recon_loss.png", "bits_per_pack.png")

# Column name -> path into results.json. Keys that an older run lacks become NaN.
CONFIG_COLUMNS: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "data": ("data",),
    "w_bits": ("quant", "w_bits"),
    "a_bits": ("quant", "a_bits"),
    "act_placement": ("quant", "act_placement"),
    "first_last_bits": ("quant", "first_last_bits"),
    "attn_prob": ("quant", "attn_prob"),
    "ln_reparam": ("quant", "ln_reparam"),
    "packing_policy": ("packing", "policy"),
    "packing_loss": ("packing", "loss"),
    "mp_policy": ("mp", "policy"),
    "mp_avg_bits": ("mp", "avg_bits"),
}
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "fp_top1": ("fp_top1",),
    "rtn_top1": ("rtn_top1",),
    "quant_top1": ("quant_top1",),
    "val_top1": ("val_top1",),
    "fp_val_top1": ("fp_val_top1",),
    "rtn_val_top1": ("rtn_val_top1",),
    "agreement": ("agreement",),
    "w_bits_avg": ("w_bits_avg",),
    "a_bits_avg": ("a_bits_avg",),
    "size_bytes": ("size_bytes",),
}
# Metrics derived from lists/dicts in results.json rather than read as scalars.
DERIVED_METRICS = ("n_packs", "time_total_s")
METRICS = tuple(METRIC_COLUMNS) + DERIVED_METRICS
# Per-run columns that are neither grouped on nor averaged.
RUN_COLUMNS = ("run_dir", "overrides", "bits", "pack_sizes", "packs", "units", "recon_loss")
# Override keys that never make a row of their own: they do not change results.
IGNORED_OVERRIDES = ("seed", "logger", "threads", "progress", "run_dir", "cache_dir", "experiment",
                     "trainer", "hydra")
# Config groups whose choice (``packing=block``, ``quant=w3a3``) the config columns already show.
_GROUPS = ("model", "data", "quant", "packing", "mp", "recon")
_FIXED = set(CONFIG_COLUMNS) | {"seed"} | set(METRICS) | set(RUN_COLUMNS)
# The fields of results.json a record keeps (what the tables and plots read), besides the
# config and the packptq version.
RECORD_KEYS = ("model", "data", "seed", "quant", "packing", "mp", "fp_top1", "rtn_top1", "quant_top1",
               "agreement", "rtn_agreement", "val_size", "fp_val_top1", "rtn_val_top1", "val_top1",
               "w_bits_avg", "a_bits_avg", "size_bytes", "units", "unit_keys", "packs", "bits", "scores",
               "recon_loss", "time_s", "calib_size", "overrides", "config", "packptq")
# Config keys a record leaves out: paths of the machine that ran it.
MACHINE_KEYS = ("run_dir", "cache_dir")


def override_columns(df: pd.DataFrame) -> list[str]:
    """The columns ``collect`` made from Hydra overrides (``data.calib_size``, ``recon.iters``, ...)."""
    stats = {f"{m}_{stat}" for m in METRICS for stat in ("mean", "std")} | {"n_seeds"}
    return [c for c in df.columns if c not in _FIXED | stats and not str(c).startswith(("_", "ref_"))]


def _shown_elsewhere(key: str) -> bool:
    """Whether an override key is already a config column: a group choice (``packing=block``)
    or the path of one (``packing.policy``, ``quant.w_bits``)."""
    if key in _GROUPS or key.split("/")[0] in _GROUPS and "." not in key:
        return True
    return tuple(key.split(".")) in CONFIG_COLUMNS.values() or key in ("model.name", "data.name")


def _parse_overrides(overrides: Any) -> dict[str, Any]:
    """``["data.calib_size=16", "+model.kwargs.x=1"]`` -> ``{"data.calib_size": 16, ...}``,
    numbers as numbers; keys in IGNORED_OVERRIDES and keys a config column shows left out."""
    out: dict[str, Any] = {}
    for item in overrides if isinstance(overrides, list) else []:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if (not sep or key in _FIXED or key.split(".")[0].split("/")[0] in IGNORED_OVERRIDES
                or _shown_elsewhere(key)):
            continue
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out

# How each metric appears in the markdown table: (header, scale, decimals).
_DISPLAY: dict[str, tuple[str, float, int]] = {
    "fp_top1": ("FP top-1 (%)", 1.0, 2),
    "rtn_top1": ("RTN top-1 (%)", 1.0, 2),
    "quant_top1": ("top-1 (%)", 1.0, 2),
    "fp_val_top1": ("FP val top-1 (%)", 1.0, 2),
    "rtn_val_top1": ("RTN val top-1 (%)", 1.0, 2),
    "val_top1": ("val top-1 (%)", 1.0, 2),
    "agreement": ("agreement (%)", 1.0, 2),
    "w_bits_avg": ("W bits", 1.0, 2),
    "a_bits_avg": ("A bits", 1.0, 2),
    "size_bytes": ("size (MB)", 1e-6, 3),
    "n_packs": ("packs", 1.0, 1),
    "time_total_s": ("time (s)", 1.0, 1),
}
# Short names of the config columns in legends and labels.
_SHORT = {"packing_policy": "packing", "packing_loss": "score loss", "mp_policy": "mp",
          "mp_avg_bits": "mp budget", "w_bits": "W", "a_bits": "A", "first_last_bits": "first/last bits",
          "act_placement": "acts at", "attn_prob": "softmax quantizer", "ln_reparam": "LN reparam"}


# --------------------------------------------------------------------------- records
def _get(record: dict, path: tuple[str, ...]) -> Any:
    """``record[path[0]][path[1]]...``, or NaN where any level is missing or null."""
    node: Any = record
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return np.nan
        node = node[key]
    if isinstance(node, dict):  # e.g. model given as a section: use its name
        return node.get("name", np.nan)
    return node


def make_record(results: dict, run: str) -> dict:
    """The compact record of one run: ``run`` (its directory, relative to the directory the
    report was made from), the ``RECORD_KEYS`` fields of its ``results.json`` (the config and
    the packptq version included) and the final loss of each reconstruction unit."""
    record = {"run": run, **{k: results[k] for k in RECORD_KEYS if k in results}}
    if isinstance(record.get("config"), dict):  # where this machine kept things: not a setting
        record["config"] = {k: v for k, v in record["config"].items() if k not in MACHINE_KEYS}
    losses = record.get("recon_loss")
    if isinstance(losses, dict):
        record["recon_loss"] = {k: v[-1] for k, v in losses.items() if isinstance(v, list) and v}
    return record


class Gathered(list):
    """The records found under some directories (a list), with ``failed``: one
    ``{"run", "error"}`` per sweep job that failed, never finished or never started, and
    ``meta``: the report settings (``by``, ``reference``) of a single records file read."""

    def __init__(self, records=(), failed=(), meta=None):
        super().__init__(records)
        self.failed = list(failed)
        self.meta = meta or {}


def read_records(path: str | Path) -> Gathered:
    """Read a ``records.json`` written by ``write_records``."""
    data = json.loads(Path(path).read_text())
    return Gathered(data.get("runs", []), data.get("failed", []), data.get("report", {}))


def write_records(path: str | Path, records: Sequence[dict], failed: Sequence[dict] = (),
                  meta: dict | None = None) -> Path:
    """Write ``records.json``: ``{"report": meta, "runs": [...], "failed": [...]}``, one run
    per line so that a change to one run is one line of a diff."""
    lines = ['{"report": ' + json.dumps(meta or {}, sort_keys=True) + ',', ' "runs": [']
    lines += [" " + json.dumps(r) + ("," if i < len(records) - 1 else "")
              for i, r in enumerate(records)]
    lines += [" ],", ' "failed": ' + json.dumps(list(failed), sort_keys=True) + "}"]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_label(base: Path, run_dir: Path, prefix: str) -> str:
    """``run_dir``'s name in a report: its path relative to ``base`` (the directory given),
    under ``prefix`` when several were given; a run directory given itself is its name."""
    if run_dir == base:
        return prefix or base.name
    rel = run_dir.relative_to(base).as_posix()
    return f"{prefix}/{rel}" if prefix else rel


def _sweep_size(sweep: Path) -> int | None:
    """Jobs a Hydra sweep directory's ``multirun.yaml`` asks for (product of the comma lists
    of its sweeper params and task overrides), or None when it cannot be read."""
    try:
        import yaml

        cfg = yaml.safe_load((sweep / "multirun.yaml").read_text())
        hyd = cfg["hydra"]
        params = {str(k): str(v) for k, v in (hyd.get("sweeper", {}).get("params") or {}).items()}
        for item in hyd["overrides"]["task"]:
            key, _, value = str(item).partition("=")
            params[key] = value
    except (OSError, KeyError, TypeError, AttributeError, ValueError, ImportError):
        return None
    n = 1
    for value in params.values():
        if any(t in value for t in ("range(", "choice(", "interval(", "glob(")):
            return None
        depth, count = 0, 1
        for ch in value:
            depth += ch in "[({" and 1 or (-1 if ch in "])}" else 0)
            count += ch == "," and depth == 0
        n *= count
    return n


def _failures(base: Path, prefix: str, found: int) -> list[dict]:
    """The jobs under ``base`` without a ``results.json``: failed (their ``error.txt`` line),
    unfinished (a ``.hydra`` folder and nothing else), and never started (fewer jobs than the
    sweep's ``multirun.yaml`` asks for)."""
    def job_overrides(job: Path) -> str:
        try:
            import yaml

            items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        except (OSError, ImportError, ValueError):
            return ""
        return " ".join(str(i) for i in items if str(i).split("=")[0].lstrip("+~") not in ("logger", "threads", "progress"))

    out = []
    for err in sorted(base.rglob(ERROR_FILE), key=lambda p: _natural(str(p))):
        if not (err.parent / RESULTS_FILE).exists():
            lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
            out.append({"run": _run_label(base, err.parent, prefix), "overrides": job_overrides(err.parent),
                         "error": lines[-1] if lines else "(empty)"})
    for hyd in sorted(base.rglob(".hydra"), key=lambda p: _natural(str(p))):
        job = hyd.parent
        if job != base and not (job / RESULTS_FILE).exists() and not (job / ERROR_FILE).exists():
            out.append({"run": _run_label(base, job, prefix), "overrides": job_overrides(job),
                        "error": f"unfinished: no {RESULTS_FILE} and no {ERROR_FILE} (killed or still running)"})
    expected = _sweep_size(base)
    if expected is not None and found + len(out) < expected:
        out.append({"run": _run_label(base, base, prefix),
                    "error": f"never started: {expected - found - len(out)} of the {expected} jobs that "
                             "multirun.yaml sweeps have no directory"})
    return out


def gather(paths: Sequence[str | Path]) -> Gathered:
    """Records of every run found (recursively) under ``paths``: ``results.json`` files of run
    and multirun directories, and the runs of ``records.json`` files (report folders). Each
    record's ``run`` is its directory relative to the path it was found under (prefixed with
    that path's name when several paths are given). Failed, unfinished and missing jobs of a
    sweep are in ``.failed``. A file that is not valid JSON (a run killed while writing) is
    skipped with a warning. Raises FileNotFoundError when a path does not exist or holds no run."""
    out = Gathered()
    seen: set[Path] = set()  # a file reachable from two paths counts once
    several = len(paths) > 1
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or multirun directory: {p}")
        base = p.parent if p.is_file() else p
        prefix = p.name if several and p.is_dir() else ""
        if p.is_file():
            files = [p]
        else:
            # records.json beside run directories is a report made from them: the runs count once
            files = sorted(p.rglob(RESULTS_FILE)) or sorted(p.rglob(RECORDS_FILE))
        found = 0
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            if f.name == RECORDS_FILE:
                sub = read_records(f)
                where = f.parent.relative_to(base).as_posix() if f.parent != base else ""
                tag = "/".join(t for t in (prefix, where) if t)
                for r in sub:
                    out.append({**r, "run": f"{tag}/{r['run']}" if tag else r["run"]})
                out.failed += [{**e, "run": f"{tag}/{e['run']}" if tag else e["run"]} for e in sub.failed]
                if len(paths) == 1 and f.parent == base:
                    out.meta = sub.meta
                continue
            try:
                record = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                warnings.warn(f"skipping unreadable {f}: {exc}")
                continue
            if not isinstance(record, dict):
                warnings.warn(f"skipping {f}: not a JSON object")
                continue
            out.append(make_record(record, _run_label(base, f.parent, prefix)))
            found += 1
        if p.is_dir():
            out.failed += _failures(p, prefix, found)
    if not out:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise FileNotFoundError(f"no readable {RESULTS_FILE} or {RECORDS_FILE} under {where}")
    return out


def _row(record: dict) -> dict[str, Any]:
    row: dict[str, Any] = {name: _get(record, key) for name, key in CONFIG_COLUMNS.items()}
    row["seed"] = _get(record, ("seed",))
    row.update({name: _get(record, key) for name, key in METRIC_COLUMNS.items()})
    packs = record.get("packs")
    row["n_packs"] = len(packs) if isinstance(packs, list) else np.nan
    times = record.get("time_s")
    row["time_total_s"] = (
        float(sum(v for v in times.values() if isinstance(v, (int, float))))
        if isinstance(times, dict) and times else np.nan
    )
    # Lists are stored as JSON strings so that they survive a CSV round trip.
    bits = record.get("bits")
    row["bits"] = json.dumps(bits) if isinstance(bits, list) and bits else np.nan
    has_packs = isinstance(packs, list) and packs
    row["pack_sizes"] = json.dumps([len(p) for p in packs]) if has_packs else np.nan
    row["packs"] = json.dumps(packs) if has_packs else np.nan
    units, keys = record.get("units"), record.get("unit_keys")
    row["units"] = (json.dumps(dict(zip(keys, units))) if isinstance(units, list) and isinstance(keys, list)
                    and len(units) == len(keys) else np.nan)
    losses = record.get("recon_loss")
    if isinstance(losses, dict):  # a record holds the final loss, results.json [first, last]
        losses = {k: v[-1] if isinstance(v, list) else v for k, v in losses.items() if v not in (None, [])}
    row["recon_loss"] = json.dumps(losses) if isinstance(losses, dict) and losses else np.nan
    overrides = record.get("overrides")
    row.update(_parse_overrides(overrides))
    row["overrides"] = " ".join(map(str, overrides)) if isinstance(overrides, list) else ""
    row["run_dir"] = record.get("run", "")
    return row


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per record (see ``collect``). A run that did not override a key another run
    did shows the value of its own config there, so runs of different sweeps compare."""
    rows = [_row(r) for r in records]
    extra = sorted({k for r in rows for k in r} - _FIXED)
    for row, record in zip(rows, records):
        for key in extra:
            if key not in row and record.get("config"):
                value = _config(record, *key.split("."))
                row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    columns = [*CONFIG_COLUMNS, *extra, "seed", *METRICS, *RUN_COLUMNS]
    df = pd.DataFrame(rows, columns=columns)
    for name in METRICS:
        df[name] = pd.to_numeric(df[name], errors="coerce")
    return df


def collect(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run found (recursively) under ``paths`` (see ``gather``).

    ``paths`` are run directories, multirun directories (``multirun/DATE/TIME/N/``), results
    files or report folders (their ``records.json``). Columns: ``CONFIG_COLUMNS``, one per
    varying Hydra override, ``seed``, ``METRICS``, ``run_dir`` (relative, see ``gather``),
    ``overrides`` (space-joined), ``bits``, ``pack_sizes``, ``packs``, ``units`` and
    ``recon_loss`` (JSON, or NaN)."""
    return frame(gather(paths))


# --------------------------------------------------------------------------- summarize
def summarize(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1) of each metric over seeds.

    Groups by ``by`` (default: every config column and every override column present in
    ``df``, so each setting a sweep varies is a row of its own); missing values are a
    group of their own. Output columns: the group columns, ``n_seeds``, then
    ``<metric>_mean`` and ``<metric>_std`` per metric (std is NaN for a single seed).
    A group that holds the same seed twice means runs differing in a setting that is not a
    column; that is warned about, since its spread is then not a seed spread."""
    if by is None:
        by = [*CONFIG_COLUMNS, *override_columns(df)]
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise KeyError(f"no column {missing} to group by; columns: {list(df.columns)}")
    by = [c for c in by if c in df.columns]
    metrics = [m for m in METRICS if m in df.columns]
    if not by:  # one group of everything
        df = df.assign(_all="all")
        by = ["_all"]
    grouped = df.groupby(by, dropna=False, sort=True)
    try:
        out = grouped[metrics].agg(["mean", "std"])
    except TypeError:  # a column mixing types (e.g. 8 and "none") cannot be sorted
        grouped = df.groupby(by, dropna=False, sort=False)
        out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out.insert(0, "n_seeds", grouped.size())
    for key, group in grouped:
        seeds = group["seed"].dropna() if "seed" in group else pd.Series(dtype=float)
        if seeds.duplicated().any():
            warnings.warn(
                f"group {key} has repeated seeds {sorted(seeds[seeds.duplicated()].unique())}: "
                "its runs differ in a setting that is not a report column"
            )
    out = out.reset_index()
    return out.drop(columns=["_all"], errors="ignore")


# --------------------------------------------------------------------------- markdown
def _fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if float(v).is_integer() else f"{float(v):.4g}"
    if isinstance(v, (np.integer, np.bool_)):
        return str(v.item())
    return str(v)


def _fmt_mean_std(mean: float, std: float, scale: float, decimals: int) -> str:
    if pd.isna(mean):
        return ""
    text = f"{mean * scale:.{decimals}f}"
    if not pd.isna(std):
        text += f" ± {std * scale:.{decimals}f}"
    return text


def format_summary(summary: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Display form of ``summarize``'s output: strings, "mean ± std" cells, size in MB.

    Config columns that are empty everywhere are dropped; with more than one row, config
    columns that are the same in every row are moved out into the returned ``constants``
    dict, so the table shows only what varies. Returns ``(table, constants)``."""
    config = [c for c in summary.columns if c in CONFIG_COLUMNS or c in override_columns(summary)]
    constants: dict[str, str] = {}
    shown = []
    for c in config:
        values = summary[c]
        if values.isna().all():
            continue
        if len(summary) > 1 and values.nunique(dropna=False) == 1:
            constants[c] = _fmt_value(values.iloc[0])
            continue
        shown.append(c)
    table = pd.DataFrame({c: summary[c].map(_fmt_value) for c in shown}, index=summary.index)
    table["seeds"] = summary["n_seeds"].astype(int).astype(str)
    for m, (header, scale, decimals) in _DISPLAY.items():
        mean, std = summary.get(f"{m}_mean"), summary.get(f"{m}_std")
        if mean is None or mean.isna().all():
            continue
        table[header] = [_fmt_mean_std(a, b, scale, decimals) for a, b in zip(mean, std)]
    if "ref_top1" in summary and (summary["ref_top1"] != "").any():
        table["reference top-1 (%)"] = summary["ref_top1"].values
        table["top-1 - reference"] = summary["ref_diff"].values
        table["reference source"] = summary["ref_source"].values
    return table.reset_index(drop=True), constants


def to_markdown(summary: pd.DataFrame) -> str:
    """A GitHub markdown table of ``summarize``'s output (see ``format_summary``)."""
    table, constants = format_summary(summary)
    lines = []
    if constants:
        lines += ["All rows: " + ", ".join(f"{k}={v}" for k, v in constants.items()), ""]
    cells = [list(table.columns)] + table.astype(str).values.tolist()
    esc = [[c.replace("|", "\\|") for c in row] for row in cells]
    lines.append("| " + " | ".join(esc[0]) + " |")
    lines.append("|" + "|".join("---" for _ in esc[0]) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- settings header
def _config(record: dict, *path: str) -> Any:
    node: Any = record.get("config") or {}
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


# (label, getter) of the settings every report states; each read from the records.
SETTINGS: tuple[tuple[str, Callable[[dict], Any]], ...] = (
    ("range-search error norm", lambda r: (r.get("quant") or {}).get("range_norm")),
    ("rounding learning rate (`recon.w_lr`)", lambda r: _config(r, "recon", "w_lr")),
    ("block-score loss (`packing.loss`)", lambda r: (r.get("packing") or {}).get("loss")),
    ("first/last layer bits (`quant.first_last_bits`)",
     lambda r: ((r.get("quant") or {}).get("first_last_bits") or "the run's bits")
     if "first_last_bits" in (r.get("quant") or {}) else None),
    ("activation quantizers at (`quant.act_placement`)", lambda r: (r.get("quant") or {}).get("act_placement")),
    ("iterations per unit (`recon.iters`)", lambda r: _config(r, "recon", "iters")),
    ("calibration images", lambda r: r.get("calib_size")),
    ("validation split (`data.val_size`, training samples)", lambda r: r.get("val_size")),
)


def _values(records: Sequence[dict], get: Callable[[dict], Any]) -> list[str]:
    vals = {_fmt_value(get(r)) or "not recorded" for r in records}

    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)
    return sorted(vals, key=key)


def settings_header(records: Sequence[dict], title: str) -> str:
    """The markdown head of a report: its title, where it comes from (records, packptq
    commits) and the settings that matter, each read from the records. A setting that differs
    between runs says so, and for the rounding rate, which split can choose among them."""
    commits = sorted({(r.get("packptq") or {}).get("commit") or "not recorded" for r in records})
    has_val = any(isinstance(r.get("val_top1"), (int, float)) for r in records)
    lines = [f"# {title}", "",
             f"Made by `packptq-report` from `{RECORDS_FILE}` beside it ({len(records)} run{'s' * (len(records) != 1)}; packptq "
             f"commit {', '.join(c[:12] if c != 'not recorded' else c for c in commits)}); "
             "`packptq-report --check` regenerates it. Top-1 in %, mean ± std over seeds.", "",
             "| setting | value |", "|---|---|"]
    for label, get in SETTINGS:
        vals = _values(records, get)
        text = ", ".join(vals)
        if label.startswith("rounding") and len(vals) == 1:
            text += " in every run (not chosen by these runs)"
        elif label.startswith("rounding"):
            text += (" (varies: choose on the validation column, never on test)" if has_val else
                     " (varies; these runs hold no validation split, so a choice among them would be made on test)")
        elif len(vals) > 1:
            text += " (varies)"
        lines.append(f"| {label} | {text} |")
    seeds = sorted({int(r["seed"]) for r in records if isinstance(r.get("seed"), (int, float))})
    lines.append(f"| seeds | {', '.join(map(str, seeds)) or 'not recorded'} |")
    return "\n".join(lines) + "\n"


def packs_section(df: pd.DataFrame, max_lines: int = 20) -> str:
    """Markdown list of the packs each setting's runs formed (block names, count of runs)."""
    if "packs" not in df.columns or df["packs"].isna().all():
        return ""
    keys = _varying(df, [*CONFIG_COLUMNS, *override_columns(df)])
    lines = ["## Packs (units of blocks; count of runs)", ""]
    for (setting, packs), group in df.dropna(subset=["packs"]).groupby(
            [df.apply(lambda r: _setting_label(r, keys), axis=1), "packs"], sort=True):
        text = " | ".join(",".join(p) for p in json.loads(packs))
        lines.append(f"- {setting}: `{text}` ({len(group)})")
    if len(lines) > max_lines + 2:
        lines = lines[:max_lines + 2] + [f"- ... {len(lines) - max_lines - 2} more in results.csv"]
    return "\n".join(lines) + "\n"


def failures_section(failed: Sequence[dict]) -> str:
    """Markdown list of the sweep jobs that left no result, each with its error line."""
    if not failed:
        return ""
    lines = [f"## Failed or missing jobs ({len(failed)})", ""]
    lines += [f"- `{f['run']}`" + (f" (`{f['overrides']}`)" if f.get("overrides") else "")
              + f": {str(f['error']).replace('|', '/')}" for f in failed]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reference numbers
REFERENCE_COLUMNS = ("model", "data", "w_bits", "a_bits", "method", "mp", "top1", "source")
# A reference's method -> the packing policy of the runs it matches (case-insensitive); a
# packing policy name matches itself. Block-wise reconstruction drops inputs (QDrop) unless
# recon.drop_prob=1, which is BRECQ.
METHODS = {"rtn": "none", "adaround": "layer", "brecq": "block", "qdrop": "block", "pack-ptq": "hessian"}


def read_reference(path: str | Path) -> list[dict]:
    """Rows of a reference CSV (``REFERENCE_COLUMNS``); rows with an empty ``top1`` (a
    template's cells) are left out. Raises ValueError naming a missing column or a bad value."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REFERENCE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: reference CSV lacks column(s) {', '.join(missing)}; "
                             f"its header must be {','.join(REFERENCE_COLUMNS)}")
        rows = []
        for n, row in enumerate(reader, start=2):
            if not (row.get("top1") or "").strip():
                continue
            try:
                ref = {"model": row["model"].strip(), "data": row["data"].strip(),
                       "w_bits": int(row["w_bits"]), "a_bits": int(row["a_bits"]),
                       "method": row["method"].strip(), "mp": (row["mp"] or "none").strip(),
                       "top1": float(row["top1"]), "source": row["source"].strip()}
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {n}: {exc}; w_bits/a_bits are integers, top1 a percentage") from None
            if not ref["source"]:
                raise ValueError(f"{path}, line {n}: a reference number needs its source (paper table, URL)")
            rows.append(ref)
    return rows


def _method_matches(method: str, row: pd.Series) -> bool:
    policy = _fmt_value(row.get("packing_policy"))
    m = method.lower()
    if m == "brecq":
        return policy == "block" and row.get("recon.drop_prob") == 1
    if m == "qdrop":
        return policy == "block" and row.get("recon.drop_prob", 0.5) != 1
    return METHODS.get(m, m) == policy


def add_reference(summary: pd.DataFrame, reference: Sequence[dict]) -> pd.DataFrame:
    """``summary`` with ``ref_top1``, ``ref_diff`` (own mean top-1 minus the reference, in
    points) and ``ref_source`` on every row that one reference row matches (model, data, W/A
    bits, method, mp policy); several matches are joined with "; "."""
    out = summary.copy()
    tops, diffs, sources = [], [], []
    for _, row in out.iterrows():
        hits = [r for r in reference
                if all(_fmt_value(row.get(k)) == _fmt_value(r[k]) for k in ("model", "data", "w_bits", "a_bits"))
                and (_fmt_value(row.get("mp_policy")) or "none") == r["mp"] and _method_matches(r["method"], row)]
        mean = row.get("quant_top1_mean", np.nan)
        tops.append("; ".join(f"{h['top1']:.2f}" for h in hits))
        diffs.append("; ".join(f"{mean - h['top1']:+.2f}" for h in hits) if not pd.isna(mean) else "")
        sources.append("; ".join(f"{h['method']}: {h['source']}" for h in hits))
    out["ref_top1"], out["ref_diff"], out["ref_source"] = tops, diffs, sources
    return out


# --------------------------------------------------------------------------- plots
def _label(values: Iterable[Any]) -> str:
    return " / ".join(_fmt_value(v) or "-" for v in values)


def _distinct(frame: pd.DataFrame, col: str) -> list[str]:
    if col not in frame.columns:
        return []
    return sorted({_fmt_value(v) for v in frame[col].dropna()})


def plot_title(frame: pd.DataFrame) -> str:
    """``resnet18 on mnist5k, W4A4`` from the model, data and bit columns of ``frame``; several
    models or bit settings are listed (``W2A4, W3A3``), more than four are "mixed bits"."""
    model = ", ".join(_distinct(frame, "model")) or "?"
    data = ", ".join(_distinct(frame, "data")) or "?"
    pairs = sorted({(_fmt_value(w), _fmt_value(a)) for w, a in zip(
        frame.get("w_bits", pd.Series(dtype=float)), frame.get("a_bits", pd.Series(dtype=float)))
        if _fmt_value(w) or _fmt_value(a)})
    bits = ", ".join(f"W{w or '?'}A{a or '?'}" for w, a in pairs) if len(pairs) <= 4 else "mixed bits"
    return f"{model} on {data}" + (f", {bits}" if bits else "")


def _varying(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].nunique(dropna=False) > 1]


def _setting_label(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{_SHORT.get(k, k)}={_fmt_value(row[k]) or '-'}" for k in keys) or "all runs"


def _settings(frame: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """The config and override columns that vary across ``frame``'s rows: what tells one
    setting from another (one legend entry each)."""
    return [c for c in _varying(frame, [*CONFIG_COLUMNS, *override_columns(frame)]) if c not in exclude]


def plot_top1_by_setting(summary: pd.DataFrame):
    """Top-1 (%) of each row of the summary (one setting of the varying columns): quantized
    and RTN (initialisation only) as bars with the spread over seeds, FP as a marker. The
    ablation view: readable whatever the bits. Returns the Figure."""
    keys = _settings(summary)
    labels = [_setting_label(r, keys).replace(", ", "\n") for _, r in summary.iterrows()]
    x = np.arange(len(summary))
    longest = max((len(line) for lab in labels for line in lab.splitlines()), default=10)
    per_bar = max(1.4, 0.065 * longest)  # room for the longest line of a label
    fig = Figure(figsize=(max(6.5, per_bar * len(x) + 3.5), 4.6 + 0.12 * max(len(keys) - 2, 0)),
                 layout="constrained")
    ax = fig.subplots()
    for off, metric, name in ((-0.2, "rtn_top1", "RTN (init only)"), (0.2, "quant_top1", "reconstructed")):
        if f"{metric}_mean" in summary:
            ax.bar(x + off, summary[f"{metric}_mean"], width=0.4, label=name,
                   yerr=summary[f"{metric}_std"].fillna(0), capsize=3)
    if "fp_top1_mean" in summary:
        ax.scatter(x, summary["fp_top1_mean"], marker="_", s=600, color="black", label="FP", zorder=3)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("top-1 (%)")
    low = np.nanmin([summary[c].min() for c in ("rtn_top1_mean", "quant_top1_mean", "fp_top1_mean")
                     if c in summary] or [0.0])
    if np.isfinite(low):  # the differences, not the distance from 0
        ax.set_ylim(bottom=max(0.0, float(low) - 5.0))
    ax.set_title(plot_title(summary) + "\ntop-1 of each setting, mean ± std over seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _block_axis(unit_maps: Sequence[dict]) -> tuple[list[str], dict[str, int]]:
    """The x axis of the per-unit plot: the names units are made of (prefix layers, blocks,
    suffix layers) in network order, merged over runs; a layer inside a block (``layer1.0.conv1``
    of layer-wise runs) sits at its block's position. Returns (axis names, name -> position)."""
    names = {n for m in unit_maps for names in m.values() for n in names}
    parent = {n: next((p for p in names if n.startswith(p + ".")), n) for n in names}
    order: list[str] = []
    for m in unit_maps:
        seq = []
        for unit_names in m.values():
            for n in unit_names:
                if not seq or seq[-1] != parent[n]:
                    seq.append(parent[n])
        at = 0
        for n in seq:
            if n in order:
                at = order.index(n) + 1
            else:
                order.insert(at, n)
                at += 1
    pos = {n: order.index(parent[n]) for n in names}
    return order, pos


def plot_recon_loss(df: pd.DataFrame):
    """Final reconstruction loss of every unit of every run (log scale), drawn as a bar across
    the blocks the unit holds, one colour per setting: runs whose packs differ are compared
    block by block, never by unit number. Returns the Figure, or None when no run has
    per-unit losses."""
    if "recon_loss" not in df.columns or df["recon_loss"].isna().all():
        return None
    runs = df.dropna(subset=["recon_loss"])
    keys = _settings(runs)
    maps = []
    for _, r in runs.iterrows():
        units = json.loads(r["units"]) if isinstance(r.get("units"), str) else {}
        maps.append({k: units.get(k, [k]) for k in json.loads(r["recon_loss"])})
    axis, pos = _block_axis(maps)
    settings = runs.apply(lambda r: _setting_label(r, keys), axis=1)
    fig = Figure(figsize=(max(7.0, 0.45 * len(axis) + 3), 4.6 + 0.2 * settings.nunique()), layout="constrained")
    ax = fig.subplots()
    colours = {s: f"C{i % 10}" for i, s in enumerate(sorted(settings.unique()))}
    for i, (_, r) in enumerate(runs.iterrows()):
        losses = json.loads(r["recon_loss"])
        colour = colours[settings.iloc[i]]
        for unit, loss in losses.items():
            xs = [pos[n] for n in maps[i][unit]]
            lo, hi = min(xs) - 0.4, max(xs) + 0.4
            ax.hlines(loss, lo, hi, color=colour, lw=2, alpha=0.7)
            ax.plot([(lo + hi) / 2], [loss], marker="o", ms=3, color=colour, alpha=0.7)
    for s, colour in colours.items():
        n = int((settings == s).sum())
        ax.plot([], [], color=colour, lw=2, label=f"{s} ({n} run{'s' * (n > 1)})")
    ax.set_xticks(range(len(axis)), axis, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("blocks (a bar spans the blocks its unit holds)")
    ax.set_ylabel("final reconstruction loss of the unit")
    ax.set_title(plot_title(runs) + ": reconstruction loss per unit", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")
    return fig


def plot_top1_vs_bits(summary: pd.DataFrame, ax=None):
    """Quantized top-1 (%) against achieved average weight bits, error bars over seeds.

    One series (legend entry) per setting: every config or override column that varies,
    except the weight bits and the mixed-precision budget, which the x axis shows; dashed grey
    lines mark each model's FP top-1. Returns the Figure."""
    keys = _settings(summary, exclude=("w_bits", "mp_avg_bits"))
    own = ax is None
    if own:
        n = len(summary.groupby(keys, dropna=False)) if keys else 1
        ax = Figure(figsize=(8, 4.5 + 0.2 * n), layout="constrained").subplots()
    fig = ax.figure
    data = summary.dropna(subset=["w_bits_avg_mean", "quant_top1_mean"])
    if data.empty:
        ax.text(0.5, 0.5, "no run has both w_bits_avg and quant_top1", ha="center",
                transform=ax.transAxes)
    groups = data.groupby(keys, dropna=False, sort=True) if keys else [((), data)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values("w_bits_avg_mean")
        ax.errorbar(
            g["w_bits_avg_mean"], g["quant_top1_mean"],
            yerr=g["quant_top1_std"].fillna(0), xerr=g["w_bits_avg_std"].fillna(0),
            marker="o", capsize=3, label=_setting_label(pd.Series(dict(zip(keys, key))), keys),
        )
    if "fp_top1_mean" in summary.columns and "model" in summary.columns:
        # one FP network per model and data set; those with the same accuracy share a line
        by = [c for c in ("model", "data") if c in summary.columns]
        fp = summary.groupby(by, dropna=False)["fp_top1_mean"].mean().dropna()
        several_data = "data" in summary.columns and summary["data"].nunique() > 1
        for value, models in fp.groupby(fp.round(2)):
            ax.axhline(value, ls="--", lw=0.8, color="grey")
            keys = [k if isinstance(k, tuple) else (k,) for k in models.index]
            names = ", ".join(" on ".join(map(_fmt_value, k)) if several_data else _fmt_value(k[0]) for k in keys)
            ax.annotate(f"FP {names}", (0.01, value), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("average weight bits (achieved)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(plot_title(summary), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        if own:  # below the plot: setting labels can be long
            fig.legend(fontsize=7, loc="outside lower center")
        else:
            ax.legend(fontsize=7, framealpha=0.9)
    return fig


def plot_bits_per_pack(df: pd.DataFrame, max_panels: int = 12):
    """Per-pack weight bits of every run with a ``bits`` list, one panel per distinct
    allocation (model, bits, pack sizes), at most ``max_panels``. Bars span the blocks of
    their pack when pack sizes are known; a dashed line marks the achieved average bits.
    Returns the Figure, or None when no run has a ``bits`` list."""
    if "bits" not in df.columns:
        return None
    runs = df.dropna(subset=["bits"])
    if runs.empty:
        return None
    pack_sizes = runs["pack_sizes"] if "pack_sizes" in runs else pd.Series(np.nan, runs.index)
    keys = pd.DataFrame({
        "model": runs["model"].map(_fmt_value) if "model" in runs else "",
        "bits": runs["bits"].astype(str),
        "sizes": pack_sizes.fillna("").astype(str),
    })
    panels = list(runs.groupby([keys["model"], keys["bits"], keys["sizes"]], sort=True))
    shown = panels[:max_panels]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, ((model, bits_json, sizes_json), group) in zip(axes.flat, shown):
        bits = json.loads(bits_json)
        sizes = json.loads(sizes_json) if sizes_json else [1] * len(bits)
        if len(sizes) != len(bits):
            sizes = [1] * len(bits)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        ax.bar(starts, bits, width=sizes, align="edge", edgecolor="black", alpha=0.8)
        avg = group["w_bits_avg"].mean() if "w_bits_avg" in group else np.nan
        if not pd.isna(avg):
            ax.axhline(avg, ls="--", color="C3", lw=1, label=f"avg {avg:.2f}")
            ax.legend(fontsize=7, loc="upper right")
        tags = sorted({_label(r) for r in group[[c for c in ("packing_policy", "mp_policy")
                                                 if c in group]].itertuples(index=False)})
        ax.set_title(f"{model} {', '.join(tags)} ({len(group)} run{'s' * (len(group) > 1)})",
                     fontsize=8)
        ax.set_xlabel("block" if sizes_json else "pack")
        ax.set_ylabel("weight bits")
        ax.set_ylim(0, max(bits) + 1)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    if len(panels) > len(shown):
        fig.suptitle(f"first {len(shown)} of {len(panels)} allocations", fontsize=9)
    return fig


# --------------------------------------------------------------------------- files
def write_report(df: pd.DataFrame, out_dir: str | Path, by: Sequence[str] | None = None,
                 records: Sequence[dict] | None = None, failed: Sequence[dict] = (),
                 reference: Sequence[dict] | None = None) -> dict[str, Path]:
    """Write ``results.csv`` (one row per run), ``summary.csv``, ``summary.md`` (rows grouped
    by ``by``, default: every config and override column), ``top1_vs_bits.png``,
    ``top1_by_setting.png``, ``recon_loss.png`` (when runs have per-unit losses) and, when some
    run has a bit allocation, ``bits_per_pack.png`` into ``out_dir``. With ``records`` (what
    ``gather`` returns) also ``records.json``, and ``summary.md`` opens with the settings
    header; ``failed`` jobs are listed with their error line; ``reference`` rows (see
    ``read_reference``) are put beside the rows they match. Returns {file name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df, by)
    if reference:
        summary = add_reference(summary, reference)
    written = {name: out / name for name in TABLES}
    df.to_csv(written["results.csv"], index=False)
    summary.to_csv(written["summary.csv"], index=False)
    parts = [settings_header(records, plot_title(df)) if records else "", to_markdown(summary),
             packs_section(df), failures_section(failed)]
    written["summary.md"].write_text("\n".join(p for p in parts if p))
    if records is not None:
        meta = {"by": list(by) if by else None, "reference": list(reference) if reference else None}
        written[RECORDS_FILE] = write_records(out / RECORDS_FILE, records, failed, meta)
    figures = {"top1_vs_bits.png": plot_top1_vs_bits(summary),
               "top1_by_setting.png": plot_top1_by_setting(summary),
               "recon_loss.png": plot_recon_loss(df),
               "bits_per_pack.png": plot_bits_per_pack(df)}
    for name, fig in figures.items():
        if fig is not None:
            written[name] = out / name
            fig.savefig(written[name], dpi=120)
        else:  # a plot left from an earlier report would no longer match the tables
            (out / name).unlink(missing_ok=True)
    return written


def load_report(report_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read back ``(results, summary)`` written by ``write_report``."""
    d = Path(report_dir)
    return pd.read_csv(d / "results.csv"), pd.read_csv(d / "summary.csv")


def regenerate(report_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Remake the report of a folder from its ``records.json`` (with the grouping and the
    reference rows it was made with) into ``out_dir``."""
    got = read_records(Path(report_dir) / RECORDS_FILE)
    return write_report(frame(got), out_dir, got.meta.get("by"), records=got, failed=got.failed,
                        reference=got.meta.get("reference"))


def _first_difference(a: str, b: str) -> str:
    la, lb = a.splitlines(), b.splitlines()
    for n, (x, y) in enumerate(zip(la, lb), start=1):
        if x != y:
            at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            lo = max(0, at - 30)
            return f"line {n}: committed ...{x[lo:at + 30]!r}, regenerated ...{y[lo:at + 30]!r}"
    return f"{len(la)} lines committed, {len(lb)} regenerated"


#: files a report folder may hold besides what ``write_report`` writes: its commands and prose
ALLOWED = ("README.md",)


def check(root: str | Path) -> tuple[list[str], list[Path]]:
    """Regenerate every report folder (a folder with ``records.json``) under ``root`` from its
    records and compare the tables with the committed ones. Returns (mismatches, one line
    each; the report folders checked). A table that differs or is missing, a plot the report
    makes that is missing, or a file the report does not make (other than ``ALLOWED``) is a
    mismatch. Plots are checked for presence, not pixels (they depend on the matplotlib
    version)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    folders = sorted(f.parent for f in root.rglob(RECORDS_FILE))
    problems: list[str] = []
    for folder in folders:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                written = regenerate(folder, tmp)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                problems.append(f"{folder}: cannot regenerate from {RECORDS_FILE}: {exc}")
                continue
            for name in written:
                mine = folder / name
                if not mine.exists():
                    problems.append(f"{mine}: missing (packptq-report makes it from {RECORDS_FILE})")
                elif name.endswith((".md", ".csv")):
                    old, new = mine.read_text(), (Path(tmp) / name).read_text()
                    if old != new:
                        problems.append(f"{mine}: differs from its regeneration, {_first_difference(old, new)}")
            for extra in sorted(folder.iterdir()):
                if extra.is_file() and extra.name not in written and extra.name not in ALLOWED:
                    problems.append(f"{extra}: not made by packptq-report from {RECORDS_FILE}")
    if not folders:
        problems.append(f"{root}: no {RECORDS_FILE} under it, nothing to check")
    return problems, folders


def main(argv: Sequence[str] | None = None) -> int:
    """``packptq-report DIR [DIR...] [--out OUT] [--by KEY...] [--reference CSV]``: collect,
    summarize, write, print; ``packptq-report --check DIR``: regenerate and compare."""
    parser = argparse.ArgumentParser(
        prog="packptq-report",
        description="Tabulate and plot the results.json files under run/multirun directories "
                    "(or the records.json of report folders).",
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="run, multirun or report directory")
    parser.add_argument("--out", help="output directory (default: first DIR/report)")
    parser.add_argument("--by", nargs="+", metavar="KEY",
                        help="columns that make a row (default: every config column and every "
                             "override that varies across the runs), e.g. --by data.calib_size")
    parser.add_argument("--reference", metavar="CSV",
                        help="reference results (columns " + ",".join(REFERENCE_COLUMNS) + ") put "
                             "beside every row they match, with their source")
    parser.add_argument("--check", metavar="DIR",
                        help="regenerate every report folder under DIR from its records.json and "
                             "exit 1 naming each table that differs")
    args = parser.parse_args(argv)
    if args.check:
        if args.dirs or args.out or args.by or args.reference:
            parser.error("--check DIR takes no other argument")
        try:
            problems, folders = check(args.check)
        except FileNotFoundError as exc:
            raise SystemExit(f"packptq-report: {exc}") from None
        for line in problems:
            print(f"packptq-report: mismatch: {line}", file=sys.stderr)
        inside = [f.resolve() for f in folders]
        others = sorted(p for p in Path(args.check).rglob("*") if p.is_file()
                        and not any(p.resolve().is_relative_to(f) for f in inside))
        if others:  # benchmark scripts' outputs: made from their own measurements, not run records
            print(f"not report folders, not checked: {', '.join(str(p) for p in others)}")
        print(f"checked {len(folders)} report folder(s) under {args.check}: "
              f"{len(problems)} mismatch(es)")
        return 1 if problems else 0
    if not args.dirs:
        parser.error("give a run, multirun or report directory (or --check DIR)")
    try:
        got = gather(args.dirs)
        reference = read_reference(args.reference) if args.reference else got.meta.get("reference")
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"packptq-report: {exc}") from None
    by = args.by or got.meta.get("by")
    first = Path(args.dirs[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first) / "report"
    try:
        written = write_report(frame(got), out, by, records=got, failed=got.failed, reference=reference)
    except KeyError as exc:
        raise SystemExit(f"packptq-report: {exc.args[0]}") from None
    print(written["summary.md"].read_text())
    print(f"{len(got)} runs")
    for f in got.failed:
        print(f"packptq-report: job {f['run']} left no result: {f['error']}", file=sys.stderr)
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
