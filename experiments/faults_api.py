"""Faults at the API and export surfaces, tried as a user would: ``packptq.quantize`` inputs,
``load_quantized`` on damaged files, ``packptq-export`` on broken run directories. Prints one
markdown row per fault with what happened: ``clear line`` (packptq's own error, one line; for
the command line exit 2 or 1 and no traceback), ``traceback`` (another exception, or a
command's traceback), ``silent`` (no error; what came out is described), ``works`` (an input form that should be
accepted and is).

    PYTHONPATH=. PACKPTQ_THREADS=1 python experiments/faults_api.py [--out experiments/results/faults_api.md]

Run it with another checkout first on PYTHONPATH to measure that code (the file only uses
names both sides have: ``packptq.quantize``, ``packptq.load_quantized``, ``pipeline.run``)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import packptq
from packptq.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


def net():
    torch.manual_seed(0)
    return nn.Sequential(block(1, 4, 1), block(4, 8, 2), block(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3)).eval()


def outcome(fn) -> tuple:
    try:
        r = fn()
    except ConfigError as exc:
        msg = str(exc)
        return ("clear line" if "\n" not in msg else "several lines"), msg.splitlines()[0][:150]
    except Exception as exc:  # noqa: BLE001
        return "traceback", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
    if isinstance(r, str) and r.endswith("(accepted)"):
        return "works", r[:-len(" (accepted)")]
    return "silent", r if isinstance(r, str) else "no error"


def cli(*argv) -> tuple:
    env = {**os.environ, "PACKPTQ_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", "from packptq.cli import export_main; export_main()", *map(str, argv)],
                       capture_output=True, text=True, env=env, timeout=600)
    err = r.stderr.strip().splitlines()
    if "Traceback" in r.stderr:
        return "traceback", f"exit {r.returncode}: {err[-1][:120] if err else ''}"
    if r.returncode == 0:
        return "silent", "exit 0"
    return ("clear line" if len(err) == 1 else f"{len(err)} lines"), f"exit {r.returncode}: {err[-1][:150]}"


def quantize_faults(tmp: Path) -> list:
    x = torch.randn(16, 1, 8, 8)
    nan = x.clone()
    nan[3, 0, 2, 2] = float("nan")
    ov = ["quant=w4a4", "packing=block", "recon.iters=2", "threads=1", "progress=false"]

    def q(model, data, note=""):
        def go():
            packptq.quantize(model, data, overrides=ov, run_dir=str(tmp / "q"))
            return "quantized" + note
        return go

    return [
        ("quantize: model is a state_dict", "packptq.quantize(net.state_dict(), x)", q(net().state_dict(), x)),
        ("quantize: empty calibration tensor", "packptq.quantize(net, x[:0])", q(net(), x[:0])),
        ("quantize: wrong channels", "packptq.quantize(net, torch.randn(16, 3, 8, 8))", q(net(), torch.randn(16, 3, 8, 8))),
        ("quantize: wrong rank", "packptq.quantize(net, torch.randn(16, 64))", q(net(), torch.randn(16, 64))),
        ("quantize: uint8 pixels", "packptq.quantize(net, x.to(torch.uint8))", q(net(), (x.abs() * 50).to(torch.uint8))),
        ("quantize: numpy array", "packptq.quantize(net, x.numpy())", q(net(), x.numpy())),
        ("quantize: one NaN pixel", "x[3, 0, 2, 2] = nan; packptq.quantize(net, x)", q(net(), nan)),
        ("quantize: labels of another length", "packptq.quantize(net, (x, torch.zeros(4, dtype=torch.long)))",
         q(net(), (x, torch.zeros(4, dtype=torch.long)))),
        ("quantize: a Dataset (accepted)", "packptq.quantize(net, TensorDataset(x, y))",
         q(net(), TensorDataset(x, torch.zeros(16, dtype=torch.long)), " (accepted)")),
        ("quantize: a DataLoader (accepted)", "packptq.quantize(net, DataLoader(TensorDataset(x), batch_size=4))",
         q(net(), DataLoader(TensorDataset(x), batch_size=4), " (accepted)")),
    ]


def load_faults(tmp: Path) -> list:
    """Faults of a pt file written by a finished run (``export=pt``)."""
    from conftest import tiny_cfg

    from packptq import pipeline

    run = tmp / "run"
    pipeline.run(tiny_cfg(run, "recon.iters=5", "threads=1", "export=pt"))
    good = run / "quantized.pt"
    raw = good.read_bytes()
    ref_model = packptq.load_quantized(good)
    from packptq.data import build_datamodule
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(json.loads((run / "results.json").read_text())["config"])
    dm = build_datamodule(cfg.data)
    dm.setup()
    xt = torch.cat([b[0] for b in dm.test_dataloader()])
    with torch.no_grad():
        ref = ref_model(xt)

    def loads(path):
        def go():
            m = packptq.load_quantized(path)
            with torch.no_grad():
                out = m(xt)
            if not torch.isfinite(out).all():
                return "loads; NaN logits"
            changed = (out.argmax(1) != ref.argmax(1)).float().mean().item() * 100
            return f"loads; {changed:.2f}% of predictions change"
        return go

    ck = torch.load(good, weights_only=True)
    codes = max((r["codes"] for r in ck["layers"].values()), key=len).numpy().tobytes()
    at = raw.index(codes[len(codes) // 2:len(codes) // 2 + 64])
    flipped = tmp / "flipped.pt"
    flipped.write_bytes(raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 256]) + raw[at + 256:])
    trunc = tmp / "truncated.pt"
    trunc.write_bytes(raw[:len(raw) // 2])
    half = tmp / "half.pt"
    half.write_bytes(raw[:-64])
    text = tmp / "text.pt"
    text.write_text("not a checkpoint\n")
    nan_scale = tmp / "nan_scale.pt"
    k = next(k for k in ck["state"] if k.endswith("wq.scale"))
    ck["state"][k] = ck["state"][k].clone()
    ck["state"][k][0] = float("nan")
    if "digest" in ck:  # the branch's files: a writer that computed the digest over the NaN
        from packptq import export
        ck["digest"] = export.digest(ck)
    torch.save(ck, nan_scale)
    return [
        ("load_quantized: 256 bytes flipped in a tensor record", "xor 0xFF over 256 bytes of the codes", loads(flipped)),
        ("load_quantized: a NaN scale", "ck['state'][...wq.scale][0] = nan", loads(nan_scale)),
        ("load_quantized: truncated file", "first half of the file", loads(trunc)),
        ("load_quantized: half-written file", "last 64 bytes missing", loads(half)),
        ("load_quantized: text file", "echo 'not a checkpoint' > f.pt", loads(text)),
    ], run


def export_faults(tmp: Path, run: Path) -> list:
    res = json.loads((run / "results.json").read_text())
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.json").write_text(json.dumps(res)[:200])
    incomplete = tmp / "incomplete"
    incomplete.mkdir()
    (incomplete / "results.json").write_text(json.dumps({"model": res["model"]}))
    outdir = tmp / "outdir"
    outdir.mkdir()
    (tmp / "afile").write_text("x")
    return [
        ("packptq-export: corrupt results.json", "results.json cut at 200 bytes", lambda: cli(corrupt)),
        ("packptq-export: incomplete results.json", "results.json without config", lambda: cli(incomplete)),
        ("packptq-export: --out is a directory", "--out DIR", lambda: cli(run, "--out", outdir)),
        ("packptq-export: --out not writable", "--out FILE/x.pt (a file as folder)", lambda: cli(run, "--out", tmp / "afile" / "x.pt")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("PACKPTQ_CACHE", tempfile.mkdtemp())
    tmp = Path(tempfile.mkdtemp(prefix="faults-api-"))
    rows = []
    for name, how, fn in quantize_faults(tmp):
        rows.append((name, how, *outcome(fn)))
    lf, run = load_faults(tmp)
    for name, how, fn in lf:
        rows.append((name, how, *outcome(fn)))
    for name, how, fn in export_faults(tmp, run):
        rows.append((name, how, *fn()))
    tmps = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.tmp"))
    lines = ["| fault | how | outcome | what the user sees |", "|---|---|---|---|"]
    lines += [f"| {n} | `{h}` | {o} | {m.replace('|', '/')} |" for n, h, o, m in rows]
    lines.append(f"\nTemporary files left under the scratch folder: {tmps or 'none'}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
