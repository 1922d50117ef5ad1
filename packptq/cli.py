"""Entry points: ``packptq`` (the Hydra app), ``packptq-report`` and ``packptq-export``. Thin
wrappers: the work is ``pipeline.run(cfg)``, which returns the results dict. Torch, Lightning
and Hydra are imported only by the commands that need them (``--help`` stays fast)."""
from __future__ import annotations

import ast
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from packptq.config import CONF_DIR, ConfigError, RunFailure  # noqa: F401  (CONF_DIR: one home, re-exported)

if TYPE_CHECKING:
    from omegaconf import DictConfig


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of a run directory: a resumed or requeued job continues the same run."""
    return "packptq-" + hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def sweep_group(argv: Sequence[str]) -> Optional[str]:
    """The W&B group of a multirun command line: the experiment and the keys it sweeps, e.g.
    ``quickstart:data.calib_size,seed``; None for a single run or an unparsable line."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        return None
    experiment, swept = "default", []
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if key == "experiment" and not o.is_sweep_override():
            experiment = str(o.value())
        elif o.is_sweep_override() and not key.startswith("hydra"):
            swept.append(key)
    return f"{experiment}:{','.join(sorted(swept)) or 'sweep'}"


def make_logger(cfg: DictConfig, overrides, sweep_dir: Optional[str]):
    """Instantiate the configured Lightning logger (None for ``logger=none``). A W&B run is
    named from its overrides, grouped by its sweep (``PACKPTQ_SWEEP_GROUP``, set by ``main``
    from the multirun command line; else the sweep directory's name), keeps the id of its run
    directory (``resume="allow"``) and is started here, before any phase."""
    import hydra
    from omegaconf import OmegaConf

    if cfg.get("logger") is None:
        return None
    lcfg = OmegaConf.to_container(cfg.logger, resolve=True)
    wandb_logger = "Wandb" in lcfg.get("_target_", "")
    if wandb_logger:
        os.environ.setdefault("WANDB_SILENT", "true")
        if lcfg.get("name") is None:
            lcfg["name"] = ",".join(o for o in overrides if not o.startswith(("logger", "hydra"))) or "default"
        if lcfg.get("group") is None and sweep_dir:
            lcfg["group"] = os.environ.get("PACKPTQ_SWEEP_GROUP") or os.path.basename(os.path.normpath(sweep_dir))
        lcfg.setdefault("id", wandb_run_id(cfg.run_dir))
        lcfg.setdefault("resume", "allow")
        lcfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    logger = hydra.utils.instantiate(lcfg, _convert_="all")  # plain dicts: W&B cannot sanitise DictConfig
    if wandb_logger:
        # Lightning hands wandb.init anonymous=None, which W&B answers with a deprecation warning
        # on every run that no setting of ours can avoid
        init = getattr(logger, "_wandb_init", {})
        if init.get("anonymous", "unset") is None:
            del init["anonymous"]
        logger.experiment  # noqa: B018  (starts the run now: a failure in any phase is recorded)
    return logger


class _Tee:
    """A text stream writing to ``stream`` and its lines to ``copy``: a line rewritten in place
    (``\\r``, a progress bar's refresh) reaches ``copy`` only in the state it ends in."""

    def __init__(self, stream, copy) -> None:
        self._stream, self._copy, self._line = stream, copy, ""

    def write(self, text: str) -> int:
        if self._copy is not None:
            try:
                for piece in re.split(r"(\r|\n)", text):
                    if piece == "\n":
                        self._copy.write(self._line + "\n")
                        self._line = ""
                    elif piece == "\r":
                        self._line = ""
                    else:
                        self._line += piece
                self._copy.flush()
            except (OSError, ValueError):  # a full disk (or a closed log) stops the copy, not the run
                self._copy = None
        return self._stream.write(text)

    def close_line(self) -> None:
        """Copy the unfinished line, if any (the state a bar was left in)."""
        if self._line and self._copy is not None:
            try:
                self._copy.write(self._line + "\n")
            except (OSError, ValueError):
                self._copy = None
            self._line = ""

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Console(logging.Handler):
    """The ``packptq`` logger on the command line: information as ``[packptq] ...`` lines on
    stdout, warnings and errors as ``packptq: warning: ...`` on stderr. The streams are looked
    up for each record, so ``console_copy`` puts the lines in ``packptq.log`` too."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                sys.stderr.write(f"packptq: {record.levelname.lower()}: {msg}\n")
                sys.stderr.flush()
            else:
                sys.stdout.write(f"[packptq] {msg}\n")
                sys.stdout.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Give the library's ``packptq`` logger its console handler (once) at ``level``; its
    records do not also go to Hydra's root handlers."""
    lg = logging.getLogger("packptq")
    if not any(isinstance(h, _Console) for h in lg.handlers):
        lg.addHandler(_Console())
    lg.setLevel(level)
    lg.propagate = False


@contextmanager
def console_copy(run_dir: str):
    """Everything printed to stdout and stderr (the ``packptq`` log, tables, errors) also goes
    to ``packptq.log`` in the run directory (appended: a resumed run adds to it); a progress bar
    only as the line it ends with."""
    configure_logging()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "packptq.log"), "a", encoding="utf-8") as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        try:
            yield
        except BaseException:
            try:
                traceback.print_exc(file=f)
            except (OSError, ValueError):
                pass
            raise
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee):
                    tee.close_line()
            sys.stdout, sys.stderr = out, err


def run_with_logging(cfg: DictConfig, overrides=(), sweep_dir: Optional[str] = None) -> dict:
    """``pipeline.run`` under the run directory's writer lock (a second process on it is
    refused), with the console copied to ``packptq.log`` and the configured logger."""
    from packptq.artifacts import writer_lock

    with writer_lock(str(cfg.run_dir)), console_copy(str(cfg.run_dir)):
        return _run_with_logging(cfg, overrides, sweep_dir)


def _run_with_logging(cfg: DictConfig, overrides=(), sweep_dir: Optional[str] = None) -> dict:
    """``pipeline.run`` with the logger around it. A W&B run ends with exit code 0 when the
    job succeeds and 1 when it raises (the exception is re-raised)."""
    from packptq import pipeline

    logger = make_logger(cfg, list(overrides), sweep_dir)
    is_wandb = logger is not None and "Wandb" in type(logger).__name__
    status = "failed"
    try:
        results = pipeline.run(cfg, overrides=overrides, logger=logger)
        if is_wandb:
            logger.experiment.summary.update(_summary(results))
            _wandb_artifacts(logger, cfg.run_dir)
        status = "success"
        return results
    finally:
        if logger is not None:
            try:
                logger.finalize(status)
            except Exception:
                pass
            if is_wandb:
                import wandb

                wandb.finish(exit_code=0 if status == "success" else 1)


def _summary(results: dict) -> dict:
    """The scalar results (and phase times) for the W&B run summary."""
    out = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and k != "run_dir"}
    out.update({f"time/{k}_s": v for k, v in (results.get("time_s") or {}).items()})
    return out


def _wandb_artifacts(logger, run_dir: str) -> None:
    import wandb

    art = wandb.Artifact("packptq-results", type="results")
    for name in ("results.json", "packs.json", "bits.json", "scores.json"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            art.add_file(path)
    logger.experiment.log_artifact(art)


def full_errors() -> bool:
    """Developers see tracebacks with HYDRA_FULL_ERROR=1; users see one line."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(exc: BaseException) -> str:
    """``exc`` as the single line a user reads: the message of packptq's own errors, an
    OSError's reason and file, else its type and the first line of its message."""
    if isinstance(exc, (ConfigError, RunFailure)):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or ['(no message)'])[0]}"


#: `.hydra/*.yaml` of an existing run directory named on the command line, read before Hydra
#: rewrites them: a refused command puts them back, so it changes nothing in the old run
_HYDRA_FILES: dict = {}


def _argv_value(argv, key: str) -> Optional[str]:
    """The value the last ``key=value`` of ``argv`` gives (Hydra's rule: the last one wins)."""
    found = None
    for a in argv:
        if a.startswith(key + "="):
            found = a.split("=", 1)[1]
    return found


def unknown_choice(argv: Sequence[str], search: Sequence[str] = ()) -> Optional[str]:
    """The one-line error for a ``group=name`` override naming no file ``conf/<group>/<name>.yaml``
    (nor one in the ``search`` folders: the user config directory), else None. Top-level groups
    only; values that are sweeps of plain names (``a,b``) are checked name by name, other sweep
    syntax is left to Hydra."""
    roots = [Path(CONF_DIR), *map(Path, search)]
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or arg.startswith("~") or not key.isidentifier() or not (Path(CONF_DIR) / key).is_dir():
            continue
        if any(c in value for c in "()[]{}*$"):
            continue
        for name in value.split(","):
            if name and name != "null" and not any((r / key / f"{name}.yaml").is_file() for r in roots):
                known = sorted({p.stem for r in roots for p in (r / key).glob("*.yaml") if p.stem != "base"})
                hint = f"; any timm model: model=timm model.name={name}" if key == "model" else ""
                return f"unknown {key} '{name}'; known: {', '.join(known)}{hint}"
    return None


def _restore_hydra_files() -> None:
    for path, text in _HYDRA_FILES.items():
        try:
            Path(path).write_text(text)
        except OSError:
            pass


def _job(cfg: DictConfig) -> Optional[float]:
    """One job. Returns the validation top-1 (None without ``data.val_size``): the objective a
    tuning sweeper (``hydra/sweeper=optuna``) maximises, so test data never chooses a setting."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    sweep_dir = hc.sweep.dir if multirun else None
    _RESUME_DIR[:] = [("hydra.sweep.dir", str(sweep_dir)) if multirun else ("hydra.run.dir", str(cfg.run_dir))]
    try:
        results = run_with_logging(cfg, list(hc.overrides.task), sweep_dir)
    except Exception as exc:  # noqa: BLE001  (every failure reaches the user as one line)
        if full_errors():
            raise
        bad_input = isinstance(exc, ConfigError)
        line = one_line(exc)
        job = f" (job {hc.job.num}: {' '.join(hc.overrides.task)})" if multirun else ""
        print(f"packptq: error{job}: {line}", file=sys.stderr)
        if not multirun:
            _restore_hydra_files()
            sys.exit(2 if bad_input else 1)
        try:  # the job's directory says why it has no results.json; the sweep goes on
            Path(hc.runtime.output_dir, ERROR_FILE).write_text(line + "\n")
        except OSError:
            pass
        return None
    if multirun:
        Path(hc.runtime.output_dir, ERROR_FILE).unlink(missing_ok=True)  # a rerun job that now succeeds
    return results["val_top1"]


#: written into a sweep job's directory when the job fails (its one-line reason)
ERROR_FILE = "error.txt"
#: sweep jobs that failed, counted by SweepFailures in the launching process
_SWEEP_FAILED: list = []
#: the directory a resumed command names (set by the job that runs): [(override key, directory)]
_RESUME_DIR: list = []
#: the signal that interrupted this process (SIGINT, SIGTERM), set by its handler
_SIGNALLED: list = []


def _sweep_failures_class():
    from hydra.experimental.callback import Callback

    class SweepFailures(Callback):
        """Hydra callback (conf/config.yaml ``hydra.callbacks``): after a sweep, in the process
        that launched it (whatever the launcher), count the jobs that left an error file;
        ``main`` then exits with status 2."""

        def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
            sweep = Path(str(config.hydra.sweep.dir))
            failed = sorted(str(p.parent) for p in sweep.glob(f"*/{ERROR_FILE}"))
            _SWEEP_FAILED[:] = failed
            if failed:
                print(f"packptq: error: {len(failed)} sweep job(s) failed ({', '.join(failed[:5])}); "
                      f"each holds {ERROR_FILE}", file=sys.stderr)

    SweepFailures.__module__ = __name__
    return SweepFailures


def __getattr__(name: str):
    # ``packptq.cli.SweepFailures`` (named in conf/config.yaml) is built on first use, so that
    # importing this module does not import Hydra
    if name == "SweepFailures":
        cls = _sweep_failures_class()
        globals()["SweepFailures"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hydra_app():
    import hydra

    return hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_job)


#: the dataclass behind each ``<group>/base`` of the config tree (packptq.schemas.SCHEMAS): its
#: source file under packptq/ and its class name
SCHEMA_SOURCES = {"quant": ("quant/convert.py", "QuantConfig"), "packing": ("packing.py", "PackingConfig"),
                  "mp": ("mp/config.py", "MPConfig"), "recon": ("recon/unit.py", "ReconConfig"),
                  "model": ("zoo/build.py", "ModelConfig")}


def schema_defaults(group: str) -> dict:
    """The default values of the schema of ``group``, read from its source file without
    importing it (``packptq --help`` prints the composed config without importing torch):
    literal defaults, ``MISSING`` as ``???``, ``field(default_factory=dict|list)``."""
    rel, name = SCHEMA_SOURCES[group]
    tree = ast.parse((Path(__file__).resolve().parent / rel).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    out: dict = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        v = stmt.value
        if isinstance(v, ast.Name) and v.id == "MISSING":
            out[stmt.target.id] = "???"
        elif isinstance(v, ast.Call) and getattr(v.func, "id", None) == "field":
            factory = next(k.value for k in v.keywords if k.arg in ("default_factory", "default"))
            out[stmt.target.id] = {"dict": {}, "list": []}[factory.id] if isinstance(factory, ast.Name) \
                else ast.literal_eval(factory)
        elif v is not None:
            out[stmt.target.id] = ast.literal_eval(v)
    return out


def _register_schema_defaults() -> None:
    from hydra.core.config_store import ConfigStore

    for group in SCHEMA_SOURCES:
        ConfigStore.instance().store(group=group, name="base", node=schema_defaults(group))


def hydra_one_line(exc: BaseException) -> str:
    """Hydra's composition error (several lines: the override, the reason, the key, the object
    type, the search path) as one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(cause, type(exc)):
        lines += [ln.strip() for ln in str(cause).splitlines() if ln.strip() and ln.strip() not in lines]
    if getattr(exc, "override", None) is not None:  # OverrideParseException: the grammar's complaint
        return f"cannot parse the override '{exc.override}': {lines[0] if lines else 'bad syntax'}"
    add = next((ln.split(" use ", 1)[1] for ln in lines if ln.startswith("To append to your config use")), None)
    if add and lines[0].startswith("Could not override"):
        key = lines[0].split("'")[1]
        return (f"unknown config key '{key}' (misspelt?); `packptq --cfg job` prints every key; "
                f"to add a new one use {add}")
    drop = ("full_key:", "object_type=", "reference_type=", "See https://", "Config search path", "provider=")
    out: list = []
    for ln in (ln for ln in lines if not ln.startswith(drop)):  # "Available options in 'g':" + one per line
        if out and out[-1].endswith(":"):
            out[-1] += " " + ln
        elif out and out[-1].startswith("Available options") and not ln.endswith(":"):
            out[-1] += ", " + ln
        else:
            out.append(ln.rstrip("."))
    return "; ".join(out)


_VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


def compose_error(argv: Sequence[str]) -> Optional[str]:
    """Compose the config of ``argv`` as Hydra will (a sweep by its first value; sweeper syntax
    such as ``interval()`` is left to the sweeper) and return the one-line error, else None:
    a misspelt key, bad override syntax, ``hydra/launcher=slurm`` on a machine without SLURM.
    Hydra's own report of these is several lines and exit status 1."""
    if any(a.split("=", 1)[0] in _VALUE_FLAGS for a in argv):
        return None  # another config tree: Hydra reports on it
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        single = []
        for o, text in zip(OverridesParser.create().parse_overrides(overrides), overrides):
            if not o.is_sweep_override():
                single.append(text)
                continue
            try:
                single.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
            except Exception:  # noqa: BLE001  (glob(), interval(), tag(): checked when swept)
                pass
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=single, return_hydra_config=True)
    except Exception as exc:  # noqa: BLE001  (Hydra's and OmegaConf's composition errors)
        return hydra_one_line(exc)
    finally:
        GlobalHydra.instance().clear()
    multirun = "-m" in argv or "--multirun" in argv
    launcher = str(cfg.hydra.launcher.get("_target_", ""))
    if multirun and launcher.endswith("SlurmLauncher") and not (shutil.which("sbatch") and shutil.which("srun")):
        return ("hydra/launcher=slurm needs SLURM, and sbatch/srun are not on PATH here; run the sweep on a "
                "SLURM login node, or here with hydra/launcher=local (the same jobs as local processes) or "
                "hydra/launcher=parallel")
    return None


def _on_signal(signum, frame) -> None:
    """SIGINT / SIGTERM: stop the run where it is (finished units are kept) and let ``main``
    print the command that resumes it."""
    _SIGNALLED[:] = [signum]
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    raise KeyboardInterrupt


def resume_command(argv: Sequence[str]) -> Optional[str]:
    """The command line that resumes this interrupted run: ``argv`` with the run (or sweep)
    directory the job used, or None before a job started."""
    if not _RESUME_DIR:
        return None
    key, directory = _RESUME_DIR[0]
    kept = [a for a in argv if not a.startswith(key + "=")]
    return shlex.join(["packptq", *kept, f"{key}={os.path.abspath(directory)}"])


def main() -> None:
    # the user config directory (hydra.searchpath in config.yaml) is optional
    warnings.filterwarnings("ignore", message=r".*hydra\.searchpath.*is not available")
    argv = sys.argv[1:]
    if any(a in ("--help", "-h") for a in argv):  # Hydra's help from the schemas' source: no torch
        _register_schema_defaults()
        _hydra_app()()
        return
    group = sweep_group(argv)
    if group and "PACKPTQ_SWEEP_GROUP" not in os.environ:
        os.environ["PACKPTQ_SWEEP_GROUP"] = group  # inherited by the sweep's jobs
    user_dir = os.environ.get("PACKPTQ_CONFIG_DIR", str(Path(os.environ.get("HOME", ".")) / ".config" / "packptq"))
    bad = unknown_choice(argv, [user_dir])
    if bad:  # one line instead of Hydra's listing, before anything is imported or built
        print(f"packptq: error: {bad}", file=sys.stderr)
        sys.exit(2)
    import packptq.schemas  # noqa: F401  (registers the typed bases of conf/<group>/ choice files)

    bad = None if full_errors() else compose_error(argv)
    if bad:
        print(f"packptq: error: {bad}", file=sys.stderr)
        sys.exit(2)
    multirun = "-m" in argv or "--multirun" in argv
    run_dir = _argv_value(argv, "hydra.run.dir")
    if run_dir and not multirun:
        # an unwritable run directory is one line, not Hydra's traceback
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(run_dir) / f".probe.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            print(f"packptq: error: run directory {run_dir} is not writable ({exc.strerror or exc}); "
                  "give a writable hydra.run.dir=...", file=sys.stderr)
            sys.exit(2)
        _HYDRA_FILES.clear()
        for p in (Path(run_dir) / ".hydra").glob("*.yaml"):
            try:
                _HYDRA_FILES[str(p)] = p.read_text()
            except OSError:
                pass
    _SWEEP_FAILED.clear()
    _RESUME_DIR.clear()
    _SIGNALLED.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        _hydra_app()()
    except (KeyboardInterrupt, SystemExit) as exc:
        # Lightning turns an interrupt inside Trainer.fit into SystemExit(1)
        if not _SIGNALLED and not isinstance(exc, KeyboardInterrupt):
            raise
        signum = _SIGNALLED[0] if _SIGNALLED else signal.SIGINT
        again = resume_command(argv)
        print(f"packptq: interrupted ({signal.Signals(signum).name}); finished units are kept"
              + (f"; resume with: {again}" if again else ""), file=sys.stderr)
        sys.exit(128 + signum)
    if _SWEEP_FAILED:
        sys.exit(2)


def report_main(argv=None) -> None:
    try:
        from packptq import report
    except ImportError as exc:  # pandas / matplotlib are the `report` extra
        print(f"packptq-report: error: {exc.name or exc} is not installed; "
              'install the report extra: pip install "packptq[report]"', file=sys.stderr)
        sys.exit(2)

    sys.exit(report.main(argv))


def export_main(argv=None) -> None:
    """``packptq-export RUN_DIR --format pt|onnx [--out PATH]``: the finished run's quantized
    model (rebuilt from its FP weights and finished units ``unit_XX.pt``, without calibrating)
    as a deployable file. Bad input exits 2, a failure 1, with one line; no file is left
    half-written."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="packptq-export", description=export_main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("run_dir")
    ap.add_argument("--format", choices=("pt", "onnx"), default="pt")  # export.FORMATS (torch not imported for --help)
    ap.add_argument("--out", default=None, help="output file (default RUN_DIR/quantized.FORMAT)")
    args = ap.parse_args(argv)
    configure_logging()
    try:
        from packptq.runtime import set_threads

        set_threads(os.environ.get("PACKPTQ_THREADS"))  # as config.yaml's threads reads it
        res = _export(args.run_dir, args.format, args.out)
    except Exception as exc:  # noqa: BLE001  (every failure reaches the user as one line)
        if full_errors():
            raise
        print(f"packptq-export: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    print(f"[packptq] export {res['format']}: {res['path']} ({res['bytes']} bytes; FP weights {res['fp_bytes']} "
          f"bytes); top-1 agreement with the quantized model {res['agreement']:.2f}% on {res['n']} test inputs "
          f"({res['source']})", file=sys.stderr)
    print(json.dumps(res))


def _export(run_dir: str, fmt: str, out: Optional[str]) -> dict:
    """``packptq-export``'s work: the run's quantized model from its unit files (or, where
    they do not hold the whole quantized state, through the run's phases), written and checked."""
    from packptq import export

    res = export.read_results(run_dir)
    out = out or export.default_path(run_dir, fmt)
    if Path(out).is_dir():
        raise export.ExportError(f"--out {out} is a directory; give the file to write (e.g. {Path(out) / f'quantized.{fmt}'})")
    built = export.from_units(run_dir, res)
    if built is None:  # no reconstruction, mixed precision, ln_reparam: the phases rebuild it
        from omegaconf import OmegaConf

        from packptq import pipeline

        cfg = OmegaConf.create(res["config"])
        cfg.run_dir, cfg.progress, cfg.export = str(run_dir), False, None
        info = pipeline.export_run(pipeline.quantized(cfg), fmt, out)
        return {**info, "source": "rebuilt through the run's phases (calibration included)"}
    qmodel, rec, x_check, fp_file = built
    info = export.export_quantized(qmodel, rec, fmt, out, x_check)
    info["fp_bytes"] = fp_file.stat().st_size if fp_file is not None and fp_file.is_file() else None
    return {**info, "source": f"read from {len(res['unit_keys'])} unit files"}
