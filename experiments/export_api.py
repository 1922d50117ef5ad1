"""What the API's exports give, measured: ``save_quantized`` -> ``load_quantized(path,
model=...)`` logits against the quantized module, ``export_onnx`` in onnxruntime, file sizes
against FP, onnxruntime CPU milliseconds per image of the QDQ graph against the FP graph, and
the wall time of ``packptq-export`` reading a run's unit files against rebuilding it through
its phases (calibration included). Writes experiments/results/export_api.md.

    PYTHONPATH=. PACKPTQ_THREADS=1 python experiments/export_api.py [--run RUN_DIR] [--out experiments/results/export_api.md]

``--run``: a finished run directory for the resnet18 rows (made by ``packptq model=resnet18
data=mnist5k quant=w4a4 recon.iters=200 run_dir=RUN_DIR`` when absent). The custom model is
the one of examples/quantize_custom.py (sklearn digits, 8x8)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def ort_ms_per_image(path, x: torch.Tensor, batch: int, level: str, repeats: int = 3) -> float:
    """Median over ``repeats`` passes of onnxruntime (CPU, one thread) over ``x`` in batches of
    ``batch``, in CPU milliseconds per image (the process's CPU time, which other processes on a
    shared machine do not inflate as they do wall time)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            {"basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}[level])
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    chunks = [x[i:i + batch].numpy() for i in range(0, len(x), batch)]
    sess.run(None, {"input": chunks[0]})  # warm-up
    times = []
    for _ in range(repeats):
        t = time.process_time()
        for c in chunks:
            sess.run(None, {"input": c})
        times.append((time.process_time() - t) / len(x) * 1e3)
    return sorted(times)[len(times) // 2]


def fp_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def measure(name: str, fp_model: nn.Module, qmodel: nn.Module, fresh, x: torch.Tensor, tmp: Path,
            fp_file_bytes: int, recipe=None) -> dict:
    """``fresh``: a new instance of the FP class for ``load_quantized(model=)``, or None to
    rebuild from the zoo ``recipe`` saved in the file."""
    import packptq
    from packptq import export

    slug = name.split()[0]
    pt = packptq.save_quantized(qmodel, tmp / f"{slug}.pt", recipe)
    loaded = packptq.load_quantized(pt, model=fresh) if fresh is not None else packptq.load_quantized(pt)
    with torch.no_grad():
        ref, fp_logits = qmodel(x), fp_model(x)
        diff = (loaded(x) - ref).abs().max().item()
    qdq = packptq.export_onnx(qmodel, tmp / f"{slug}.onnx", x[:1])
    fpo = fp_onnx(fp_model, x[:1], tmp / f"{slug}_fp.onnx")
    row = {"model": name, "n": len(x), "load_max_abs_diff": diff}
    for level in ("basic", "all"):
        out = export.onnx_predict(qdq, x, optimization=level)
        row[f"ort_{level}_agree"] = (out.argmax(1) == ref.argmax(1)).float().mean().item() * 100
        row[f"ort_{level}_max_diff"] = (out - ref).abs().max().item()
    row["fp_vs_q_agree"] = (fp_logits.argmax(1) == ref.argmax(1)).float().mean().item() * 100
    row.update(fp_bytes=fp_file_bytes, pt_bytes=pt.stat().st_size, onnx_bytes=qdq.stat().st_size,
               fp_onnx_bytes=fpo.stat().st_size)
    for batch in (1, 64):
        for level in ("basic", "all"):
            row[f"ms_qdq_b{batch}_{level}"] = ort_ms_per_image(qdq, x, batch, level)
            row[f"ms_fp_b{batch}_{level}"] = ort_ms_per_image(fpo, x, batch, level)
    return row


def custom_case(tmp: Path) -> dict:
    """The example's Net, trained and quantized as examples/quantize_custom.py does."""
    import runpy

    ns = runpy.run_path(str(ROOT / "examples" / "quantize_custom.py"), run_name="example")
    net, qnet, x = ns["net"], ns["qnet"], ns["x"]
    fp_bytes = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    return measure("custom CNN (examples/quantize_custom.py), W4A4", net, qnet, ns["Net"](), x[1400:], tmp,
                   fp_bytes)


def _child_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def export_timing(run_dir: Path) -> dict:
    """Wall and CPU seconds of ``packptq-export RUN_DIR --format pt`` reading the unit files,
    and of the rebuild through the run's phases it did before (``pipeline.quantized`` +
    ``export_run``)."""
    env = {**os.environ, "PACKPTQ_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = {}
    cmd = [sys.executable, "-c", "from packptq.cli import export_main; export_main()", str(run_dir), "--format", "pt",
           "--out", str(run_dir / "units.pt")]
    t, c = time.perf_counter(), _child_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out["units_s"], out["units_cpu_s"] = time.perf_counter() - t, _child_cpu() - c
    out["units_report"] = json.loads(r.stdout.strip().splitlines()[-1])
    out["units_stderr_lines"] = len(r.stderr.strip().splitlines())
    phases = ("from omegaconf import OmegaConf; import json, sys; from packptq import pipeline; "
              "cfg = OmegaConf.create(json.load(open(sys.argv[1] + '/results.json'))['config']); "
              "cfg.progress = False; cfg.export = None; "
              "print(json.dumps(pipeline.export_run(pipeline.quantized(cfg), 'pt', sys.argv[1] + '/phases.pt')))")
    t, c = time.perf_counter(), _child_cpu()
    r = subprocess.run([sys.executable, "-c", phases, str(run_dir)], capture_output=True, text=True, env=env)
    out["phases_s"], out["phases_cpu_s"] = time.perf_counter() - t, _child_cpu() - c
    out["phases_stdout_lines"] = len(r.stdout.strip().splitlines())
    import packptq

    a, b = packptq.load_quantized(run_dir / "units.pt"), packptq.load_quantized(run_dir / "phases.pt")
    sa, sb = a.state_dict(), b.state_dict()
    out["same_state"] = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return out


def resnet_case(run_dir: Path, tmp: Path) -> dict:
    from packptq import export, fp
    from packptq.data import build_datamodule
    from packptq.zoo.build import ModelConfig
    from packptq.config import typed
    from omegaconf import OmegaConf

    res = export.read_results(run_dir)
    qmodel, rec, x, fp_file = export.from_units(run_dir, res, n_check=512)
    cfg = OmegaConf.create(res["config"])
    mcfg = typed(ModelConfig, cfg.model, "model")
    dm = build_datamodule(cfg.data)
    fp_model = fp.obtain(fp.build(mcfg, dm), dm, mcfg, cfg.cache_dir, {}).eval()
    return measure(f"{res['model']} on {res['data']}, W{res['quant']['w_bits']}A{res['quant']['a_bits']}", fp_model,
                   qmodel, None, x, tmp, fp_file.stat().st_size, rec)


HEADER = """# The API's exports: save/load, ONNX in onnxruntime, sizes, CPU time

Command: `PYTHONPATH=. PACKPTQ_THREADS=1 python experiments/export_api.py --run RUN_DIR --out experiments/results/export_api.md`
(RUN_DIR: `packptq model=resnet18 data=mnist5k quant=w4a4 recon.iters=200 run_dir=RUN_DIR`, made by
the script when absent). Rows: the custom CNN of `examples/quantize_custom.py` (quantized through
`packptq.quantize`, reloaded with `load_quantized(path, model=Net())`), and the resnet18 run's
quantized model as `packptq-export` rebuilds it from its unit files (reloaded from its zoo recipe).
n: test inputs compared. ORT: onnxruntime on CPU at graph optimisation level basic (the QDQ graph
as written) and all (fused kernels). Sizes: the FP weights (float32 state dict or the training
cache entry), the pt file, the QDQ ONNX file (weight codes one per byte), the FP ONNX file.
Times are CPU time of one thread (the machine is shared; wall time is not reported for ORT).

"""


def table(rows) -> str:
    head = ("| model | n | load_quantized max abs logit diff | ORT basic agree / max diff | ORT all agree / max diff "
            "| FP weights | pt | QDQ ONNX | FP ONNX |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['load_max_abs_diff']:g} | {r['ort_basic_agree']:.2f}% / "
                     f"{r['ort_basic_max_diff']:.2e} | {r['ort_all_agree']:.2f}% / {r['ort_all_max_diff']:.2e} | "
                     f"{r['fp_bytes'] / 1024:.1f} KiB | {r['pt_bytes'] / 1024:.1f} KiB | {r['onnx_bytes'] / 1024:.1f} KiB "
                     f"| {r['fp_onnx_bytes'] / 1024:.1f} KiB |")
    lines += ["", "onnxruntime CPU, one thread, CPU ms per image (median of 3 passes over the n inputs; the graph "
              "optimisation level in brackets):", "",
              "| model | batch | QDQ (basic) | FP (basic) | QDQ (all) | FP (all) | QDQ / FP (all) |", "|" + "---|" * 7]
    for r in rows:
        for b in (1, 64):
            lines.append(f"| {r['model']} | {b} | {r[f'ms_qdq_b{b}_basic']:.3f} | {r[f'ms_fp_b{b}_basic']:.3f} | "
                         f"{r[f'ms_qdq_b{b}_all']:.3f} | {r[f'ms_fp_b{b}_all']:.3f} | "
                         f"{r[f'ms_qdq_b{b}_all'] / r[f'ms_fp_b{b}_all']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="export-api-"))
    rows = [custom_case(tmp)]
    timing = None
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "results.json").is_file():
            subprocess.run([sys.executable, "-m", "packptq", "model=resnet18", "data=mnist5k", "quant=w4a4",
                            "recon.iters=200", "logger=none", "progress=false", f"run_dir={run_dir}"], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(resnet_case(run_dir, tmp))
        timing = export_timing(run_dir)
    text = HEADER + table(rows)
    if timing:
        text += (f"\n\n`packptq-export RUN_DIR --format pt` on the resnet18 run: {timing['units_cpu_s']:.1f} CPU s "
                 f"({timing['units_s']:.1f} s wall) reading "
                 f"{len(json.loads((Path(args.run) / 'results.json').read_text())['unit_keys'])} unit files "
                 f"({timing['units_stderr_lines']} line(s) on stderr), against {timing['phases_cpu_s']:.1f} CPU s "
                 f"({timing['phases_s']:.1f} s wall) through the run's phases with calibration "
                 f"({timing['phases_stdout_lines']} lines printed); both files hold the same state: "
                 f"{timing['same_state']}.")
    print(text)
    print(json.dumps({"rows": rows, "timing": timing}, default=str))
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
