"""Run the notebooks in a real browser: JupyterLab headless, Chromium driven by Selenium, Run All from the menu.

What a researcher does, done by a script before a release: open the notebook in JupyterLab,
choose Run > Run All Cells, wait for the kernel to go idle, save. The check fails on any error
output or any code cell left unexecuted (read back from the saved notebook, which is exact,
where JupyterLab's page only renders the cells in view), and leaves a screenshot of the
finished notebook and the saved copy.

The notebooks are copied to a scratch folder first (saving writes outputs into them; the
repo's copies stay clean) and run with their default profile, ``smoke``, on the generated
demo data. Nothing is downloaded: the system's Chromium and chromedriver are used (Debian:
``apt-get install chromium chromium-driver``).

Usage: .venv/bin/python scripts/browser_check.py [--notebooks DFER_GCViT GReFEL | path.ipynb ...] [--out browser-check]
Exit status 0 when every notebook ran clean; figures and paths are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def find_browser() -> tuple[str, str]:
    """Paths of the system's Chromium and chromedriver; a clear error naming what is missing."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER) if p), None)
    if not browser or not driver:
        missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p]
        raise FileNotFoundError(f"browser check needs {' and '.join(missing)} on PATH "
                                "(Debian/Ubuntu: apt-get install chromium chromium-driver)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """JupyterLab serving ``root`` on a free local port; returns the process and its base URL with token."""
    port, token = _free_port(), "browser-check"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JUPYTER_RUNTIME_DIR": str(root / ".runtime"), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return proc, f"{base}|{token}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}: see {log}")
            time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"JupyterLab did not answer within 120 s: see {log}")


def open_browser(browser: str, driver_path: str, width: int = 1400, height: int = 1800):
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def _menu(driver, menu: str, command: str) -> None:
    """Click a top menu (``Run``) and then its item for ``command`` (``runmenu:run-all``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    _answer_dialog(driver)
    items = driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
    target = next((i for i in items if i.text.strip() == menu), None)
    if target is None:
        raise RuntimeError(f"no {menu!r} menu in JupyterLab's menu bar (found {[i.text for i in items]})")
    target.click()
    selector = f'.lm-Menu-item[data-command="{command}"]'
    try:  # the open menu's item (a closed menu keeps zero-size copies of its items in the page)
        wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()])[0].click()
    except Exception as exc:
        shown = [e.get_attribute("data-command") for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
                 if e.is_displayed()]
        raise RuntimeError(f"menu {menu!r} has no visible item {command!r} (items: {shown})") from exc


def _answer_dialog(driver) -> None:
    """A modal dialog in the way: the kernel choice gets its default (the notebook's own kernel,
    what a user accepts); any other dialog stops the check with its text."""
    from selenium.webdriver.common.by import By

    for dialog in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"):
        text = " ".join(dialog.text.split())
        if "Select Kernel" not in text:
            raise RuntimeError(f"an unexpected dialog in JupyterLab: {text!r}")
        print(f"kernel dialog, accepting its default: {text!r}", flush=True)
        dialog.find_element(By.CSS_SELECTOR, ".jp-mod-accept").click()
        time.sleep(1)


def _kernel_state(driver) -> str:
    """The notebook's execution indicator: ``idle``, ``busy`` or what JupyterLab shows instead."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator")
    return (found[0].get_attribute("data-status") or "unknown") if found else "none"


def _prompts(driver) -> list[str]:
    """The code cells' prompts as shown: ``[ ]:`` never run, ``[*]:`` queued or running, ``[3]:`` done."""
    from selenium.webdriver.common.by import By

    return [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]


def run_notebook(driver, base: str, name: str, out: Path, timeout_s: float) -> dict:
    """Open ``name`` in JupyterLab, Run All from the menu, wait for idle, save, screenshot; the saved notebook's verdict."""
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, token = base.split("|")
    start = time.time()
    driver.get(f"{url}/lab/tree/{name}?token={token}&reset")
    WebDriverWait(driver, 120).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook")))
    WebDriverWait(driver, 120).until(lambda d: _kernel_state(d) == "idle")
    time.sleep(2)  # the kernel's session settles (a Run All sent at once can be dropped)
    for attempt in range(3):  # Run All, until the cells' prompts show that it started
        _menu(driver, "Run", "runmenu:run-all")
        try:
            WebDriverWait(driver, 30).until(lambda d: any(p != "[ ]:" for p in _prompts(d)))
            break
        except TimeoutException:
            print(f"{name}: Run All did not start (attempt {attempt + 1}); again", flush=True)
    else:
        raise RuntimeError(f"{name}: Run All never started a cell")
    # Done when no cell is queued or running ([*]) and the kernel has been idle for 5 s in a row.
    quiet_since = None
    while time.time() - start < timeout_s:
        if _kernel_state(driver) == "idle" and "[*]:" not in _prompts(driver):
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= 5:
                break
        else:
            quiet_since = None
        time.sleep(1)
    else:
        raise TimeoutError(f"{name}: still running after {timeout_s:.0f} s in the browser")
    wall = time.time() - start
    _menu(driver, "File", "docmanager:save")
    time.sleep(3)
    for button in driver.find_elements(By.CSS_SELECTOR, ".Toastify button"):  # "notify me of Jupyter news?": No
        if button.text.strip() == "No":
            button.click()
    time.sleep(1)  # Run All leaves the last cell, with the final results, in view
    shot = out / f"{Path(name).stem}.png"
    driver.save_screenshot(str(shot))
    return {"notebook": name, "wall_s": round(wall, 1), "screenshot": str(shot), **verdict(out / name)}


def verdict(path: Path) -> dict:
    """From a saved notebook: code cells run, never run, and error outputs (name: message, cell number)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    errors = [{"cell": i, "error": f"{o.get('ename')}: {o.get('evalue')}"} for i, c in enumerate(nb.cells)
              if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    not_run = [i for i, c in enumerate(nb.cells)
               if c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None]
    return {"code_cells": len(code), "not_run": not_run, "errors": errors, "ok": not errors and not not_run}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", nargs="+", default=["DFER_GCViT", "GReFEL"])
    ap.add_argument("--out", default="browser-check", help="scratch folder: notebook copies, outputs, screenshots")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per notebook")
    args = ap.parse_args(argv)
    browser, driver_path = find_browser()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for given in args.notebooks:  # a notebook's name in the repo (DFER_GCViT) or a path to any notebook
        path = Path(given) if given.endswith(".ipynb") else ROOT / f"{given}.ipynb"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such notebook")
        shutil.copy2(path, out / path.name)
        names.append(path.name)
    lab, base = start_lab(out, out / "jupyterlab.log")
    driver = None
    try:
        driver = open_browser(browser, driver_path)
        results = []
        for name in names:
            try:
                r = run_notebook(driver, base, name, out, args.timeout)
            except Exception:
                shot = out / f"{Path(name).stem}-failure.png"
                driver.save_screenshot(str(shot))
                print(f"{name}: the browser check broke; the page as it was: {shot}")
                raise
            print(f"{Path(name).stem}: {'OK' if r['ok'] else 'FAILED'} in {r['wall_s']} s, {r['code_cells']} code cells, "
                  f"not run {r['not_run']}, errors {r['errors']}; screenshot {r['screenshot']}", flush=True)
            results.append(r)
        (out / "browser_check.json").write_text(json.dumps(results, indent=1))
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(lab.pid, 15)
        lab.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
