#!/bin/bash
# On the H200 device machine: flash-attn-4 from the carried parts (bench/h200_env.sh), then
# bench/engine.py. Usage: bash bench/run_h200.sh [engine.py args]
set -o pipefail
source "$(dirname "$0")/h200_env.sh"
TORCH_LOGS="${TORCH_LOGS:-perf_hints}" timeout 570 python3 bench/engine.py --out "$OUT" "$@" 2>&1 | tee "$OUT/engine.log"
