#!/usr/bin/env bash
# The CUDA path of packptq, checked and measured on a machine with a GPU, in under 10 minutes:
#  (a) the default run end to end on the GPU (embedded resnet18 / MNIST, W2A4, Pack-PTQ) with
#      recon.iters=200, a fresh run directory and a fresh FP cache: results.json, wall time, and
#      each unit's predicted against measured seconds (unit_XX.json);
#  (b) seconds per reconstruction step per unit on timm resnet18 and deit_tiny_patch16_224 at
#      224x224, random weights, 1,024 random calibration images (experiments/gpu_step_time.py);
#  (c) the peak GPU memory of each of those fits (torch.cuda.max_memory_allocated);
#  (d) their projection to the paper's 20,000 steps per unit.
# Everything is written to $OUT (default experiments/results/gpu_check/).
#
#   experiments/gpu_check.sh              # on a GPU machine; without a GPU it says so and stops
#   experiments/gpu_check.sh --cpu-smoke  # the same steps at tiny sizes on the CPU (a crash check)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
DEST=${OUT:-$ROOT/experiments/results/gpu_check}
[ "$SMOKE" = 1 ] && DEST=$DEST/cpu_smoke
mkdir -p "$DEST"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
cd "$ROOT"

if [ "$SMOKE" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False): nothing measured. Run it on a GPU machine, or with --cpu-smoke for the CPU variant." | tee "$DEST/no_gpu.txt"
  exit 0
fi

{ date -u +"%Y-%m-%dT%H:%M:%SZ"; git rev-parse HEAD 2>/dev/null || true
  "$PY" -c 'import torch, lightning, timm, platform; print("torch", torch.__version__, "cuda", torch.version.cuda, "lightning", lightning.__version__, "timm", timm.__version__, "python", platform.python_version()); print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

# (a) the default run end to end
RUN=$DEST/e2e_run
CACHE=$(mktemp -d)  # a fresh FP cache: the FP training runs on the device too (not kept in $OUT)
rm -rf "$RUN"
if [ "$SMOKE" = 1 ]; then
  A=(trainer.accelerator=cpu data=digits data.calib_size=64 quant=w4a4 "+model.kwargs.channels=[8,16,32,64]"
     model.train_epochs=4 recon.iters=5)
  STEP_ARGS=(--cpu-smoke)
else
  A=(trainer.accelerator=gpu recon.iters=200)
  STEP_ARGS=(--device cuda --steps 300)
fi
A+=(logger=none progress=false "hydra.run.dir=$RUN" "cache_dir=$CACHE")
echo "(a) $PY -m packptq ${A[*]}" | tee "$DEST/e2e_command.txt"
t0=$(date +%s.%N)
"$PY" -m packptq "${A[@]}" 2>&1 | tee "$DEST/e2e.log"
t1=$(date +%s.%N)
rm -rf "$CACHE"
"$PY" - "$RUN" "$t0" "$t1" "$DEST" <<'PYEOF'
import json, sys
from pathlib import Path
run, t0, t1, dest = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
res = json.loads((run / "results.json").read_text())
units = [json.loads(p.read_text()) for p in sorted(run.glob("unit_*.json"))]
rows = ["| unit | steps | predicted s | measured s | measured / predicted | cache s |", "|---|---|---|---|---|---|"]
for u in units:
    p, m = u.get("predicted_seconds"), u.get("seconds")
    rows.append(f"| {u['key']} | {len(u['loss'])} | {p} | {m} | {m / p:.2f} | {u.get('cache_seconds')} |" if p and m
                else f"| {u['key']} | {len(u['loss'])} | {p} | {m} | - | {u.get('cache_seconds')} |")
summary = {"wall_s": round(t1 - t0, 1), "time_s": res["time_s"], "fp_top1": res["fp_top1"], "rtn_top1": res["rtn_top1"],
           "quant_top1": res["quant_top1"], "device": res["config"]["trainer"].get("accelerator"),
           "units": [{k: u.get(k) for k in ("key", "seconds", "predicted_seconds", "cache_seconds", "n_weights")} for u in units]}
(dest / "e2e_results.json").write_text(json.dumps(res, indent=1))
(dest / "e2e_summary.json").write_text(json.dumps(summary, indent=1))
md = [f"(a) wall {summary['wall_s']} s; phases {res['time_s']}; FP {res['fp_top1']:.2f}%, RTN {res['rtn_top1']:.2f}%, "
      f"quantized {res['quant_top1']:.2f}%", "", *rows]
(dest / "e2e_units.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF

# (b), (c), (d): step time, peak memory and projection per unit
echo "(b) $PY experiments/gpu_step_time.py ${STEP_ARGS[*]} --json $DEST/step_time.json"
"$PY" experiments/gpu_step_time.py "${STEP_ARGS[@]}" --json "$DEST/step_time.json" 2>&1 | tee "$DEST/step_time.log"
echo "gpu_check: done; results in $DEST"
