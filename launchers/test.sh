#!/usr/bin/env bash
# The test command: set up (see setup.sh), then run the CPU suite. Extra arguments go to pytest.
# Fails when no test passed (tests/conftest.py turns an all-skipped run into a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
. launchers/python.sh
bash launchers/setup.sh
# The code sandbox has two backends; bubblewrap's tests skip unless it is installed. Best effort:
# only as root with apt, and a failure here only means those tests skip.
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }) \
    && echo "test: installed bubblewrap for the sandbox tests" \
    || echo "test: bubblewrap unavailable; its sandbox tests will skip"
fi
exec "$PYTHON" -m pytest "$@"
