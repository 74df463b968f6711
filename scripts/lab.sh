#!/usr/bin/env bash
# JupyterLab at the repo root with the project's .venv kernel; sets the environment up first if needed.
# Usage: bash scripts/lab.sh [jupyter lab options]   e.g. on a remote machine: bash scripts/lab.sh --no-browser --port 8888
# It prints the URL (with its token) to open; over SSH, forward the port: ssh -L 8888:localhost:8888 <host>
source "$(dirname "$0")/env.sh"
extra=()
if [ "$(id -u)" = 0 ]; then  # containers often run as root, which Jupyter refuses unless told
  echo "Running as root (a container?): starting JupyterLab with --allow-root"
  extra+=(--allow-root)
fi
exec jupyter lab --ServerApp.root_dir="$PWD" "${extra[@]}" "$@"
