#!/usr/bin/env bash
# The prepared GPU check (one GPU, a few minutes): the CUDA/NCCL path of models, losses and trainer,
# then the step benchmark in bf16. On a machine without megatron-core, put its wheel (and its
# dependencies' wheels) in .whl/ first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mgsr_site .whl/*.whl
  export PYTHONPATH=/tmp/mgsr_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 tools/gpu_check.py
