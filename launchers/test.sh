#!/usr/bin/env bash
# The test command: set up (see setup.sh), then run the CPU suite. Extra arguments go to pytest.
# Fails when no test passed (tests/conftest.py turns an all-skipped run into a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
exec "${PYTHON:-python3}" -m pytest "$@"
