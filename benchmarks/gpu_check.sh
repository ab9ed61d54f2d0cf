#!/usr/bin/env bash
# The GPU checks, prepared as one script for a session that is lent a device (run from the repo root):
#   bash benchmarks/gpu_check.sh            # tables into $OUT (the device tool's folder) or benchmarks/logs
# 1. the CUDA-only tests (speculative and sfm graph replay = eager bit for bit; compiled graphs = eager within
#    rounding) and the sync counts; 2. the overhead table (time outside the model, wall vs sde), batch 64 and 4.
set -uo pipefail
export PYTHONPATH=$PWD
out=${OUT:-benchmarks/logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_speculative.py tests/test_syncs.py \
    tests/test_graphs.py -k "cuda or compiled or sync or replay" 2>&1 | tail -5
timeout 300 python benchmarks/speculative.py --overhead --model unet+toy --device cuda --batch 64 4 \
    --windows 4 8 bandit --repeats 2 2>&1 | tee "$out/gpu_overhead.txt"
