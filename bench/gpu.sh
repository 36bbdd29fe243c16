#!/usr/bin/env bash
# The GPU run of the performance issue as one prepared script, for a lent device machine:
#
#   bash bench/gpu.sh                    # CUDA: Refinery (fp16, compiled UNets, CUDA graphs) vs plain fp16 diffusers
#   DEVICE=cpu QUICK=1 bash bench/gpu.sh # the same script on the tiny pair, on CPU (what the tests run)
#
# Writes $OUT/bench-$DEVICE.json (every figure, ours, baseline, ratio) and $OUT/bench-$DEVICE.png.
# Needs a CUDA build of torch in the Python on PATH (or $PYTHON); the compile warm-up of each UNet
# (minutes with max-autotune) is reported apart from the per-step times.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-bench/results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
if [[ "${QUICK:-0}" == "1" ]]; then
    set -- --quick
else
    set -- --resolution 512 1024 --steps 5 --batch 1 4
fi
"$PYTHON" bench/run.py --device "$DEVICE" "$@" --json "$OUT/bench-$DEVICE.json" --plot "$OUT/bench-$DEVICE.png"
