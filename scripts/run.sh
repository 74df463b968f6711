#!/usr/bin/env bash
# Main job: set up the environment if needed, then execute both notebooks headless.
# Usage: bash scripts/run.sh [profile]      (profile: smoke | cpu | gpu | paper; default smoke)
source "$(dirname "$0")/env.sh"
python scripts/run_notebooks.py --profile "${1:-smoke}"
