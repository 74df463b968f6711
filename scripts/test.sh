#!/usr/bin/env bash
# Test suite: set up the environment if needed, then run pytest (extra args pass through).
source "$(dirname "$0")/env.sh"
python -m pytest tests "$@"
