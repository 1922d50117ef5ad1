"""notebooks/analysis.ipynb runs top to bottom on a small report and draws its plots."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from packptq import report

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
KERNEL = "packptq-test"

pytestmark = pytest.mark.slow  # a Jupyter kernel start and the whole notebook


@pytest.fixture
def report_dir(tmp_path) -> Path:
    for seed in range(2):
        for job, (w_bits, bits) in enumerate([(3, [2, 3, 4]), (4, None)]):
            run = tmp_path / "multirun" / "2025-01-01" / f"12-00-0{seed}" / str(job)
            run.mkdir(parents=True)
            record = {
                "model": "resnet18", "seed": seed, "quant": {"w_bits": w_bits, "a_bits": 4},
                "packing": {"policy": "hessian"}, "mp": {"policy": "knapsack" if bits else None},
                "fp_top1": 90.0, "quant_top1": 50.0 + 5 * w_bits + seed,  # percent
                "w_bits_avg": w_bits + 0.1, "packs": [["a"], ["b", "c"], ["d"]], "bits": bits,
            }
            (run / "results.json").write_text(json.dumps(record))
    out = tmp_path / "report"
    report.write_report(report.collect([tmp_path / "multirun"]), out)
    return out


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec for this interpreter in a temporary Jupyter data dir: the notebook runs
    with the packages under test whatever kernels (if any) the machine has installed."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "packptq test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")]))
    # The package may not be installed (pip install -e .): let the kernel import it from here.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return KERNEL


def test_notebook_runs(report_dir, kernel, monkeypatch):
    monkeypatch.setenv("PACKPTQ_REPORT_DIR", str(report_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # top-1 by setting, top-1 vs bits, bits per pack (no per-unit losses)
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("±" in o["data"]["text/html"] for o in tables)


@pytest.mark.slow
def test_notebook_runs_on_its_default_directory(kernel, monkeypatch):
    """Without PACKPTQ_REPORT_DIR the notebook reads the committed ablation report
    (experiments/results/calib_size), so it runs on a fresh clone."""
    monkeypatch.delenv("PACKPTQ_REPORT_DIR", raising=False)
    assert (NOTEBOOK.parent / ".." / "experiments" / "results" / "calib_size" / "summary.csv").is_file()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=120,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "4 runs in 2 configurations" in text
