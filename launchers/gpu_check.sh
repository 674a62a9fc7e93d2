#!/usr/bin/env bash
# The one-script GPU check: run from the repository root on a machine with one CUDA GPU.
#   bash launchers/gpu_check.sh                 # kernels, gpu-marked tests, models on CUDA, kernel benchmark
#   bash launchers/gpu_check.sh --quick         # V=32k kernels, models, one benchmark case
#   bash launchers/gpu_check.sh --only kernels  # one or more steps (kernels,gpu-tests,models,bench)
#   bash launchers/gpu_check.sh --dry-run       # print the steps and their commands (runs anywhere)
#   bash launchers/gpu_check.sh --fetch-wheels  # beforehand, where a registry is reachable: the
#                                               # Liger-Kernel wheel into build/wheels
# Without a GPU it says so in one line and exits 2. Exit 1 if a step failed. Results: one JSON line
# per step in benchmarks/results/gpu_check.jsonl; each step's output in build/gpu_check/<step>.log.
# The steps and their commands live in benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
