"""The interactive set-up: JupyterLab from scripts/lab.sh with the project's kernel, VS Code settings."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT


def test_the_project_kernel_is_registered_in_the_venv():
    path = ROOT / ".venv" / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    if not path.exists():
        pytest.skip("no .venv kernel: run through scripts/test.sh, which sets it up")
    spec = json.loads(path.read_text())
    assert "FER pipeline .venv" in spec["display_name"]
    assert spec["argv"][0] == str(ROOT / ".venv" / "bin" / "python")  # the venv's interpreter, not a system one


def test_vscode_settings_point_at_the_venv_and_the_repo_root():
    settings = json.loads((ROOT / ".vscode" / "settings.json").read_text())
    assert settings["python.defaultInterpreterPath"] == "${workspaceFolder}/.venv/bin/python"
    assert settings["jupyter.notebookFileRoot"] == "${workspaceFolder}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_script_serves_the_notebooks_with_the_project_kernel(tmp_path):
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        pytest.skip("no .venv with jupyter: run through scripts/test.sh")
    port, token = _free_port(), "fer-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.Popen(["bash", "scripts/lab.sh", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                             f"--IdentityProvider.token={token}"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def get(path):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {token}"})
            return json.loads(urllib.request.urlopen(req, timeout=5).read())

        for _ in range(120):
            try:
                specs = get("/api/kernelspecs")
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        assert "FER pipeline .venv" in specs["kernelspecs"]["python3"]["spec"]["display_name"]
        names = {item["name"] for item in get("/api/contents/")["content"]}
        assert {"DFER_GCViT.ipynb", "GReFEL.ipynb", "helpers"} <= names  # served from the repo root
        assert get("/lab/api/settings/")  # the JupyterLab front end is there, not only a bare server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
