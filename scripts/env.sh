# Sourced by run.sh and test.sh: make sure .venv exists with the pinned requirements.
# Rebuilt only when requirements.txt changes (its hash is stamped into the venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "Setting up $VENV with $("$PY" --version) (first run: a few minutes; torch is large)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  # the project's kernel, inside the venv (Jupyter, VS Code and papermill all find it as "python3")
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (FER pipeline .venv)" >/dev/null
  echo "$want" > "$VENV/.requirements.sha256"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export MPLBACKEND=${MPLBACKEND:-Agg}
