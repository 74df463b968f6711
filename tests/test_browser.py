"""The browser check (scripts/browser_check.py): its verdict on saved notebooks, and real runs in headless Chromium.

The Chromium runs skip where the system has no Chromium and chromedriver (Debian:
``apt-get install chromium chromium-driver``); the verdict is checked everywhere.
"""

import sys

import nbformat
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import browser_check  # noqa: E402


def _notebook(path, cells):
    """cells: (source, execution_count, outputs) triples."""
    nb = nbformat.v4.new_notebook()
    for source, count, outputs in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.execution_count, cell.outputs = count, outputs
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_markdown_cell("prose is never run"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_verdict_passes_only_a_notebook_whose_every_code_cell_ran_without_error(tmp_path):
    ok = _notebook(tmp_path / "ok.ipynb", [("x = 1", 1, []), ("print(x)", 2, [nbformat.v4.new_output(
        "stream", name="stderr", text="a warning is not an error\n")]), ("   ", None, [])])
    assert browser_check.verdict(ok) == {"code_cells": 2, "not_run": [], "errors": [], "ok": True}
    error = nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])
    broken = _notebook(tmp_path / "broken.ipynb", [("x = 1", 1, []), ("raise ValueError('boom')", 2, [error]),
                                                   ("print(x)", None, [])])
    v = browser_check.verdict(broken)
    assert v["errors"] == [{"cell": 1, "error": "ValueError: boom"}] and v["not_run"] == [2] and not v["ok"]


def _browser_or_skip():
    try:
        browser_check.find_browser()
        import selenium  # noqa: F401
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"no headless browser here: {exc}")


def test_browser_check_fails_on_a_notebook_that_raises(tmp_path, capsys):
    _browser_or_skip()
    nb = _notebook(tmp_path / "raises.ipynb", [("print('first')", None, []), ("raise ValueError('boom in cell 2')",
                                                                              None, []), ("print('never')", None, [])])
    assert browser_check.main(["--notebooks", str(nb), "--out", str(tmp_path / "out"), "--timeout", "120"]) == 1
    out = capsys.readouterr().out
    assert "raises: FAILED" in out and "ValueError: boom in cell 2" in out and "not run [2]" in out
    assert (tmp_path / "out" / "raises.png").stat().st_size > 10_000  # a screenshot of the page


def test_both_notebooks_run_all_clean_in_jupyterlab_in_headless_chromium(tmp_path, capsys):
    _browser_or_skip()
    rc = browser_check.main(["--notebooks", "DFER_GCViT", "GReFEL", "--out", str(tmp_path), "--timeout", "900"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("DFER_GCViT", "GReFEL"):
        assert f"{name}: OK" in out
        assert (tmp_path / f"{name}.png").exists()
        saved = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)  # the copy, with outputs; the repo's stays clean
        assert any(c.get("outputs") for c in saved.cells if c.cell_type == "code")
    repo = nbformat.read(ROOT / "DFER_GCViT.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in repo.cells if c.cell_type == "code")
