#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a lent device machine:
#   the CUDA tests, then the engine benchmark on the GPU.
# Usage (from the repository root): bash benchmarks/gpu_check.sh
set -euo pipefail
python3 -m venv /tmp/q3n-venv && . /tmp/q3n-venv/bin/activate
pip install --quiet torch==2.13.0 2>/dev/null || pip install --quiet torch
pip install --quiet -e ".[test]"
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -q -m gpu tests/test_cuda.py
python benchmarks/bench_engine.py --device cuda --only qwen3next --rounds 1
