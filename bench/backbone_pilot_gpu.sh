#!/usr/bin/env bash
# bench/backbone_pilot.py on the device machine (README "GPU"): the backbone candidates of GReFEL's ablation,
# 24 epochs each on FER+ train, chosen on FER2013Valid; then the cpu profile's CNN for 48 epochs.
# Measured on an H100 (results/grefel_backbone_pilot_h100/): the first step reached 3 candidates in 300 s, the
# second took 200 s; the device's 15 minutes hold both with its start.
# Prepare (here): python bench/backbone_pilot.py pack <FERPlus.zip> .gpu/data/ferplus48.npz, the albumentations
# wheels in .gpu/whl and .gpu/setup.sh (see the closing lines of ../shared/gpu/prepare.sh).
# Dry run on a CPU: SMALL=1 OUT=/tmp/pilot-out bash bench/backbone_pilot_gpu.sh
set -x
OUT=${OUT:-/tmp/pilot-out}
mkdir -p "$OUT"
[ -f .gpu/setup.sh ] && source .gpu/setup.sh
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
small=(); [ -n "$SMALL" ] && small=(--epochs 1 --limit 300)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.is_available())" > "$OUT/versions.txt" 2>&1
timeout ${FIRST_S:-300} $PY bench/backbone_pilot.py train .gpu/data/ferplus48.npz "${small[@]}" --json "$OUT/pilot24.json" \
  --only r18_64 half_96 r18_64_s4 half_96_s4 half_128_s4 r18_96 > "$OUT/pilot24.log" 2>&1
echo "rc=$?" >> "$OUT/pilot24.log"
[ -n "$SMALL" ] && small=(--epochs 2 --limit 300)
timeout ${SECOND_S:-235} $PY bench/backbone_pilot.py train .gpu/data/ferplus48.npz --epochs 48 "${small[@]}" \
  --json "$OUT/pilot48.json" --only r18_64 > "$OUT/pilot48.log" 2>&1
echo "rc=$?" >> "$OUT/pilot48.log"
tail -n 3 "$OUT"/*.log
