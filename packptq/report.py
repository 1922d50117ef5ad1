"""Collect ``results.json`` files into tables and plots.

``collect`` flattens every run found under some run or multirun directories into one row per
run; ``summarize`` averages the metrics over seeds; ``write_report`` writes the CSVs, a
markdown table and the plots. ``packptq-report DIR [DIR...] [--out OUT]`` does all three.

Units are those of ``results.json`` throughout: top-1 and agreement in percent, bits per
element, sizes in bytes (MB in the markdown table), times in seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend

RESULTS_FILE = "results.json"

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
    "agreement": ("agreement",),
    "w_bits_avg": ("w_bits_avg",),
    "a_bits_avg": ("a_bits_avg",),
    "size_bytes": ("size_bytes",),
}
# Metrics derived from lists/dicts in results.json rather than read as scalars.
DERIVED_METRICS = ("n_packs", "time_total_s")
METRICS = tuple(METRIC_COLUMNS) + DERIVED_METRICS
# Per-run columns that are neither grouped on nor averaged.
RUN_COLUMNS = ("run_dir", "overrides", "bits", "pack_sizes", "recon_loss")
# Override keys that never make a row of their own: they do not change results.
IGNORED_OVERRIDES = ("seed", "logger", "threads", "progress", "run_dir", "cache_dir", "experiment",
                     "trainer", "hydra")
_FIXED = set(CONFIG_COLUMNS) | {"seed"} | set(METRICS) | set(RUN_COLUMNS)


def override_columns(df: pd.DataFrame) -> list[str]:
    """The columns ``collect`` made from Hydra overrides (``data.calib_size``, ``quant``, ...)."""
    stats = {f"{m}_{stat}" for m in METRICS for stat in ("mean", "std")} | {"n_seeds"}
    return [c for c in df.columns if c not in _FIXED | stats and not str(c).startswith("_")]


def _parse_overrides(overrides: Any) -> dict[str, Any]:
    """``["data.calib_size=16", "+model.kwargs.x=1"]`` -> ``{"data.calib_size": 16, ...}``,
    numbers as numbers; keys in IGNORED_OVERRIDES left out."""
    out: dict[str, Any] = {}
    for item in overrides if isinstance(overrides, list) else []:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not sep or key in _FIXED or key.split(".")[0].split("/")[0] in IGNORED_OVERRIDES:
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
    "agreement": ("agreement (%)", 1.0, 2),
    "w_bits_avg": ("W bits", 1.0, 2),
    "a_bits_avg": ("A bits", 1.0, 2),
    "size_bytes": ("size (MB)", 1e-6, 3),
    "n_packs": ("packs", 1.0, 1),
    "time_total_s": ("time (s)", 1.0, 1),
}
_SERIES = ("model", "packing_policy", "mp_policy")


# --------------------------------------------------------------------------- collect
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


def _find_results(paths: Iterable[str | Path]) -> list[Path]:
    found: dict[Path, None] = {}  # ordered set: a file reachable from two paths counts once
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or multirun directory: {p}")
        files = [p] if p.is_file() else sorted(p.rglob(RESULTS_FILE))
        for f in files:
            found.setdefault(f.resolve(), None)
    return list(found)


def _row(record: dict, path: Path) -> dict[str, Any]:
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
    row["pack_sizes"] = (
        json.dumps([len(p) for p in packs]) if isinstance(packs, list) and packs else np.nan
    )
    losses = record.get("recon_loss")
    row["recon_loss"] = (json.dumps({k: v[-1] for k, v in losses.items() if v})
                         if isinstance(losses, dict) and losses else np.nan)
    overrides = record.get("overrides")
    row.update(_parse_overrides(overrides))
    row["overrides"] = " ".join(map(str, overrides)) if isinstance(overrides, list) else ""
    # Where the file is now, not where it was written: run directories get moved.
    row["run_dir"] = str(path.parent)
    return row


def collect(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per ``results.json`` found (recursively) under ``paths``.

    ``paths`` are run directories, multirun directories (``multirun/DATE/TIME/N/``) or
    results files. Columns: ``CONFIG_COLUMNS``, ``seed``, ``METRICS``, ``run_dir``,
    ``overrides`` (space-joined), ``bits`` and ``pack_sizes`` (JSON lists, or NaN).
    A file that is not valid JSON (a run killed while writing) is skipped with a warning.
    Raises FileNotFoundError when a path does not exist or no results are found."""
    rows = []
    for f in _find_results(paths):
        try:
            record = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable {f}: {exc}")
            continue
        if not isinstance(record, dict):
            warnings.warn(f"skipping {f}: not a JSON object")
            continue
        rows.append(_row(record, f))
    if not rows:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise FileNotFoundError(f"no readable {RESULTS_FILE} under {where}")
    extra = sorted({k for r in rows for k in r} - _FIXED)
    columns = [*CONFIG_COLUMNS, *extra, "seed", *METRICS, *RUN_COLUMNS]
    df = pd.DataFrame(rows, columns=columns)
    for name in METRICS:
        df[name] = pd.to_numeric(df[name], errors="coerce")
    return df


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


# --------------------------------------------------------------------------- plots
def _label(values: Iterable[Any]) -> str:
    return " / ".join(_fmt_value(v) or "-" for v in values)


def _distinct(frame: pd.DataFrame, col: str) -> str:
    if col not in frame.columns:
        return ""
    return ", ".join(sorted({_fmt_value(v) for v in frame[col].dropna()}))


def plot_title(frame: pd.DataFrame) -> str:
    """``resnet18 on digits, W4A4`` from the model, data and bit columns of ``frame``."""
    model, data = _distinct(frame, "model") or "?", _distinct(frame, "data") or "?"
    w, a = _distinct(frame, "w_bits"), _distinct(frame, "a_bits")
    bits = f", W{w or '?'}A{a or '?'}" if w or a else ""
    return f"{model} on {data}{bits}"


def _varying(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c in frame.columns and frame[c].nunique(dropna=False) > 1]


def _setting_label(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_fmt_value(row[k])}" for k in keys) or "all runs"


def plot_top1_by_setting(summary: pd.DataFrame):
    """Top-1 (%) of each row of the summary (one setting of the varying columns): quantized
    and RTN (initialisation only) as bars with the spread over seeds, FP as a marker. The
    ablation view: readable whatever the bits. Returns the Figure."""
    keys = _varying(summary, [*CONFIG_COLUMNS, *override_columns(summary)])
    labels = [_setting_label(r, keys) for _, r in summary.iterrows()]
    x = np.arange(len(summary))
    fig = Figure(figsize=(max(5.0, 1.3 * len(x) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    for off, metric, name in ((-0.2, "rtn_top1", "RTN (init only)"), (0.2, "quant_top1", "reconstructed")):
        if f"{metric}_mean" in summary:
            ax.bar(x + off, summary[f"{metric}_mean"], width=0.4, label=name,
                   yerr=summary[f"{metric}_std"].fillna(0), capsize=3)
    if "fp_top1_mean" in summary:
        ax.scatter(x, summary["fp_top1_mean"], marker="_", s=600, color="black", label="FP", zorder=3)
    ax.set_xticks(x, labels, rotation=20 if len(x) > 3 else 0, ha="right" if len(x) > 3 else "center", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    low = np.nanmin([summary[c].min() for c in ("rtn_top1_mean", "quant_top1_mean", "fp_top1_mean")
                     if c in summary] or [0.0])
    if np.isfinite(low):  # the differences, not the distance from 0
        ax.set_ylim(bottom=max(0.0, float(low) - 5.0))
    ax.set_title(plot_title(summary) + (f": by {', '.join(keys)}" if keys else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    return fig


def plot_recon_loss(df: pd.DataFrame):
    """Final reconstruction loss per unit (log scale), mean over the seeds of each setting
    that have the unit (packs can differ between seeds), one line per setting. Returns the Figure, or None when no run has ``recon_loss``."""
    if "recon_loss" not in df.columns or df["recon_loss"].isna().all():
        return None
    runs = df.dropna(subset=["recon_loss"])
    keys = _varying(runs, [*CONFIG_COLUMNS, *override_columns(runs)])
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    every = {u for v in runs["recon_loss"] for u in json.loads(v)}
    # units in run order: prefix, then the packs / blocks / layers, then suffix
    units = sorted(every, key=lambda u: (u.startswith("suffix"), not u.startswith("prefix"), u))
    groups = runs.groupby(keys, dropna=False, sort=True) if keys else [((), runs)]
    for key, g in groups:
        per_run = [json.loads(v) for v in g["recon_loss"]]
        mean = [np.mean([r[u] for r in per_run if u in r]) if any(u in r for r in per_run) else np.nan
                for u in units]
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={_fmt_value(v)}" for k, v in zip(keys, key)) or "all runs"
        ax.plot(range(len(units)), mean, marker="o", label=f"{label} ({len(g)} run{'s' * (len(g) > 1)})")
    ax.set_xticks(range(len(units)), units, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("reconstruction unit")
    ax.set_ylabel("final reconstruction loss")
    ax.set_title(plot_title(runs) + ": reconstruction loss per unit", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9)
    return fig


def plot_top1_vs_bits(summary: pd.DataFrame, ax=None):
    """Quantized top-1 (%) against achieved average weight bits, error bars over seeds.

    One series per model / packing policy / mp policy (and activation bits, when those
    vary); dashed grey lines mark each model's FP top-1. Returns the Figure."""
    if ax is None:
        ax = Figure(figsize=(7, 4.5), layout="constrained").subplots()
    fig = ax.figure
    keys = [c for c in _SERIES if c in summary.columns]
    if "a_bits" in summary.columns and summary["a_bits"].nunique() > 1:
        keys.append("a_bits")
    data = summary.dropna(subset=["w_bits_avg_mean", "quant_top1_mean"])
    if data.empty:
        ax.text(0.5, 0.5, "no run has both w_bits_avg and quant_top1", ha="center",
                transform=ax.transAxes)
    groups = data.groupby(keys, dropna=False, sort=True) if keys else [((), data)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values("w_bits_avg_mean")
        label = _label(f"A{_fmt_value(v)}" if k == "a_bits" else v for k, v in zip(keys, key))
        ax.errorbar(
            g["w_bits_avg_mean"], g["quant_top1_mean"],
            yerr=g["quant_top1_std"].fillna(0), xerr=g["w_bits_avg_std"].fillna(0),
            marker="o", capsize=3, label=label or "runs",
        )
    if "fp_top1_mean" in summary.columns and "model" in summary.columns:
        fp = summary.groupby("model", dropna=False)["fp_top1_mean"].mean().dropna()
        # Models with the same FP accuracy share one line and one label.
        for value, models in fp.groupby(fp.round(2)):
            ax.axhline(value, ls="--", lw=0.8, color="grey")
            names = ", ".join(_fmt_value(m) for m in models.index)
            ax.annotate(f"FP {names}", (0.01, value), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(plot_title(summary), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, title=" / ".join(keys), title_fontsize=8, framealpha=0.9,
                  loc="center left", bbox_to_anchor=(1.01, 0.5))
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
def write_report(df: pd.DataFrame, out_dir: str | Path, by: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``results.csv`` (one row per run), ``summary.csv``, ``summary.md`` (rows grouped
    by ``by``, default: every config and override column), ``top1_vs_bits.png``,
    ``top1_by_setting.png``, ``recon_loss.png`` (when runs have per-unit losses) and, when some
    run has a bit allocation, ``bits_per_pack.png`` into ``out_dir``. Returns {file name:
    path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df, by)
    written = {name: out / name for name in ("results.csv", "summary.csv", "summary.md")}
    df.to_csv(written["results.csv"], index=False)
    summary.to_csv(written["summary.csv"], index=False)
    written["summary.md"].write_text(to_markdown(summary))
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


def main(argv: Sequence[str] | None = None) -> int:
    """``packptq-report DIR [DIR...] [--out OUT]``: collect, summarize, write, print."""
    parser = argparse.ArgumentParser(
        prog="packptq-report",
        description="Tabulate and plot the results.json files under run/multirun directories.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or multirun directory")
    parser.add_argument("--out", help="output directory (default: first DIR/report)")
    parser.add_argument("--by", nargs="+", metavar="KEY",
                        help="columns that make a row (default: every config column and every "
                             "override that varies across the runs), e.g. --by data.calib_size")
    args = parser.parse_args(argv)
    try:
        df = collect(args.dirs)
    except FileNotFoundError as exc:
        raise SystemExit(f"packptq-report: {exc}") from None
    first = Path(args.dirs[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first) / "report"
    try:
        written = write_report(df, out, args.by)
    except KeyError as exc:
        raise SystemExit(f"packptq-report: {exc.args[0]}") from None
    print(written["summary.md"].read_text())
    print(f"{len(df)} runs")
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
