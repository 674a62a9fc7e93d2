#!/usr/bin/env bash
# The main job: set up (see setup.sh; a virtual environment when the system Python refuses pip),
# then run `r1mega train` with any extra arguments. With none, it trains R1-Zero on the embedded
# tiny default: the first run pretrains the base model once (cached in ~/.cache/r1mega).
set -euo pipefail
cd "$(dirname "$0")/.."
. launchers/python.sh
bash launchers/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCH_COMPILE_DISABLE=${TORCH_COMPILE_DISABLE:-1}
exec "$PYTHON" -m r1mega.cli train "$@"
