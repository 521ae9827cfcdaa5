#!/bin/bash
# On the H200 device machine: unpack flash-attn-4 (carried as split .tar.xz parts copied to /tmp by
# earlier steps, since its wheels exceed one call's transfer limit) and run bench/engine.py.
# Usage: bash bench/run_h200.sh [engine.py args]
set -o pipefail
export PYTHONUNBUFFERED=1
SITE=/tmp/fa4site
if [ ! -d "$SITE/flash_attn" ] && ls /tmp/fa4part.* >/dev/null 2>&1; then
  cat /tmp/fa4part.* | xz -d -T0 | tar x -C /tmp || echo "flash-attn-4 unpack failed: FlexAttention only"
fi
# nvidia-cutlass-dsl's .pth is not processed for a plain folder: put dsl_packages first ourselves
export PYTHONPATH="$SITE/nvidia_cutlass_dsl/dsl_packages:$SITE:$PWD"
python3 -c "import flash_attn.cute.interface as i, cutlass, flash_attn; print('flash-attn-4 import ok', getattr(flash_attn, '__version__', '?'))" 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
TORCH_LOGS="${TORCH_LOGS:-perf_hints}" timeout 570 python3 bench/engine.py --out "$OUT" "$@" 2>&1 | tee "$OUT/engine.log"
