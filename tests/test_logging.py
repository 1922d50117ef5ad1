"""Library output goes through the ``packptq`` logger: no module of the library prints, an API
user silences it with the logger's level, the command line gives it a console handler, and
``packptq.log`` keeps lines, not the refreshes of a progress bar."""
from __future__ import annotations

import ast
import io
import logging
from pathlib import Path

from packptq import cli, fp

PKG = Path(__file__).resolve().parents[1] / "packptq"
#: the command lines: they print what their user asked for (tables, JSON, errors)
PRINTERS = {"cli.py", "report.py"}


def test_no_library_module_prints():
    found = []
    for path in PKG.rglob("*.py"):
        if path.name in PRINTERS and path.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not found, found


def test_an_api_user_silences_the_library(capsys, packptq_log):
    fp.check_not_chance(9.0, 10, trained_here=False, where=None)  # a warning for given weights
    assert len(packptq_log.records) == 1
    capsys.readouterr()  # a console handler an earlier in-process command line installed may have shown it
    logging.getLogger("packptq").setLevel(logging.ERROR)
    fp.check_not_chance(9.0, 10, trained_here=False, where=None)
    assert len(packptq_log.records) == 1
    assert capsys.readouterr().err == ""


def test_the_command_line_handler_prints_lines(capsys):
    lg = logging.getLogger("packptq")
    saved = lg.handlers[:], lg.level, lg.propagate
    try:
        cli.configure_logging()
        cli.configure_logging()  # once only
        assert sum(isinstance(h, cli._Console) for h in lg.handlers) == 1
        lg.info("FP top-1 %.2f%%", 98.2)
        lg.warning("check the data")
        out, err = capsys.readouterr()
        assert out == "[packptq] FP top-1 98.20%\n" and err == "packptq: warning: check the data\n"
    finally:
        lg.handlers[:], lg.level, lg.propagate = saved


def test_the_log_file_keeps_a_bar_only_as_the_line_it_ends_with():
    console, copy = io.StringIO(), io.StringIO()
    tee = cli._Tee(console, copy)
    tee.write("[packptq] calibrate\n")
    for i in range(1, 4):  # a tqdm bar: each refresh returns to the start of the line
        tee.write(f"\rreconstruct: {i}/3")
    tee.write("\n")
    tee.write("\rscore: 1/2\rscore: 2/2\r   \r")  # a bar that clears itself (leave=False)
    tee.write("[packptq] results:\n  quantized top-1  97.00%\n")
    tee.write("\rpartial: 1/9")
    tee.close_line()  # a bar left unfinished (an error) is kept in its last state
    assert copy.getvalue() == ("[packptq] calibrate\nreconstruct: 3/3\n[packptq] results:\n  quantized top-1  97.00%\n"
                               "partial: 1/9\n")
    assert console.getvalue().count("\r") == 8  # the console itself sees every refresh
