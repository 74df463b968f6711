#!/usr/bin/env bash
# The GPU check of issue 18, as one script for the device machine (README "GPU"):
#   1. DFER_GCViT's `gpu` profile end to end (one fold, a few epochs, weights "none": the machine has no network),
#      export, then Predict and the video demo on the exported and the live model;
#   2. bench/bench_gpu.py: gcvit_small at 224 px, bf16: the DataLoader path, the data on the device in NCHW and
#      channels-last order, then eager and torch.compile (whose compile took over 200 s on an H100).
# About 10 minutes in all: one call of `run` with timeout_s 600.
# Results go to $OUT (JSON, logs, the executed notebook). Prepare with `bash ../shared/gpu/prepare.sh kmu`.
# Dry run on a CPU: SMALL=1 OUT=/tmp/gpu-out bash bench/gpu_check.sh
set -x
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
[ -f .gpu/setup.sh ] && source .gpu/setup.sh
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PY:-python3}
if [ -n "$SMALL" ]; then  # the dry run: the same steps at toy sizes
  bench=(--model gcvit_xxtiny --size 64 --batch 8 --steps 2 --warmup 1 --images 64 --amp auto)
  dfer=(--profile smoke -p max_images 60)
else
  bench=(--model gcvit_small --size 224 --batch 128 --steps 20 --warmup 2 --images 1024 --amp bf16 --peak-tflops 989)
  dfer=(--profile gpu -p max_folds 1 -p num_epochs 3)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.is_available())" > "$OUT/versions.txt" 2>&1

# 1. the notebook end to end, Export then Predict and the video on CUDA (torch_compile off: its minutes of
# compiling are measured in 2.); papermill's kernel outlives a killed runner: end it by name afterwards
timeout 170 $PY scripts/run_notebooks.py "${dfer[@]}" --only DFER_GCViT --workdir "$OUT/work" \
  -p data_path .gpu/data/kmu-fed.zip -p weights none -p torch_compile False > "$OUT/dfer_gpu.log" 2>&1
echo "DFER_GCViT rc=$?" >> "$OUT/dfer_gpu.log"
[ -n "$SMALL" ] || pkill -f ipykernel_launcher || true  # not in dry runs: other kernels may be running here
cp "$OUT"/work/DFER_GCViT/final_results.json "$OUT/dfer_final_results.json" 2>/dev/null
rm -rf "$OUT/work/cache" "$OUT/work/extracted" "$OUT"/work/DFER_GCViT/runs/*/fold_*/*.pth "$OUT"/work/DFER_GCViT/*.pth \
  "$OUT"/work/DFER_GCViT/export "$OUT"/work/DFER_GCViT/runs/*/export
cp "$OUT"/work/runs/*.ipynb "$OUT/dfer_executed.ipynb" 2>/dev/null  # which cells ran, and their outputs

# 2. speed, side by side (each row is printed as soon as it is measured: a killed run keeps the rows before)
timeout 60 $PY bench/bench_gpu.py "${bench[@]}" --paths loader --workers 8 --json "$OUT/bench_loader.json" \
  > "$OUT/bench_loader.log" 2>&1
timeout 60 $PY bench/bench_gpu.py "${bench[@]}" --paths device --channels-last --json "$OUT/bench_nhwc.json" \
  > "$OUT/bench_nhwc.log" 2>&1
timeout 300 $PY bench/bench_gpu.py "${bench[@]}" --paths device --compile --json "$OUT/bench_device.json" \
  > "$OUT/bench_device.log" 2>&1
rm -rf "$OUT/work"
ls -R "$OUT" | head -50
