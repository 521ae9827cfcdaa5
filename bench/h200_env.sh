#!/bin/bash
# Source on the H200 device machine: unpack flash-attn-4 (carried as split .tar.xz parts that
# earlier calls copied to /tmp/fa4part.*, since its wheels exceed one call's transfer limit) and put
# it on PYTHONPATH. Without the parts, FlexAttention is the prefill backend.
export PYTHONUNBUFFERED=1
SITE=/tmp/fa4site
if [ ! -d "$SITE/flash_attn" ] && ls /tmp/fa4part.* >/dev/null 2>&1; then
  cat /tmp/fa4part.* | xz -d -T0 | tar x -C /tmp || echo "flash-attn-4 unpack failed: FlexAttention only"
fi
# nvidia-cutlass-dsl's .pth is not processed for a plain folder: put dsl_packages first ourselves
export PYTHONPATH="$SITE/nvidia_cutlass_dsl/dsl_packages:$SITE:$PWD"
python3 -c "import flash_attn.cute.interface as i, cutlass, flash_attn; print('flash-attn-4 import ok', getattr(flash_attn, '__version__', '?'))" 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
