#!/usr/bin/env bash
# Install r1mega and everything it needs into the active Python environment (or .venv/ when the
# system Python refuses pip installs: launchers/python.sh).
#   - keeps a torch that is already installed; where there is none, installs torch==2.13.0
#     (the CPU build on CPU machines; PyPI's CUDA build where a GPU driver is present);
#   - installs the triton matching that torch, without letting pip touch torch;
#   - builds csrc/ (pybind11) and installs r1mega editable, with the test tools.
# Re-running is cheap: it skips the build when pyproject.toml and csrc/ are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
. launchers/python.sh
pip_install() { "$PY" -m pip install --disable-pip-version-check --quiet "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: no torch found; installing torch==2.13.0"
  pip_install torch==2.13.0
fi

if ! "$PY" -c "import triton" 2>/dev/null; then
  triton_version=$("$PY" - <<'PY'
import importlib.metadata as md, re, torch
# CUDA builds of torch pin their triton; the CPU build does not, so fall back to known pairs.
for req in md.requires("torch") or []:
    m = re.match(r"triton\s*==\s*([\w.]+)", req)
    if m:
        print(m.group(1)); raise SystemExit
pairs = {"2.6": "3.2.0", "2.7": "3.3.1", "2.8": "3.4.0", "2.9": "3.5.1", "2.11": "3.6.0", "2.13": "3.7.1"}
print(pairs.get(".".join(torch.__version__.split(".")[:2]), ""))
PY
)
  if [ -z "$triton_version" ]; then
    echo "setup: no known triton for this torch; install the triton that matches it and re-run" >&2
    exit 1
  fi
  echo "setup: installing triton==$triton_version (matching the installed torch)"
  pip_install --no-deps "triton==$triton_version"
fi

stamp_dir=build/setup-stamp
mkdir -p "$stamp_dir"
# The editable install maps each module file by name: a module added or moved needs a re-install.
digest=$( (cat pyproject.toml csrc/*; find r1mega kernels -name '*.py' | LC_ALL=C sort) | sha256sum | cut -c1-16)
# -I: not from the working directory, so that an editable install of another clone (setup run
# there last) is seen as such and replaced by this one.
if [ "$(cat "$stamp_dir/digest" 2>/dev/null)" != "$digest" ] \
   || ! "$PY" -I -c "import r1mega._batching, r1mega_kernels, pytest, xdist, filelock, hypothesis" 2>/dev/null \
   || [ "$("$PY" -I -c "import pathlib, r1mega; print(pathlib.Path(r1mega.__file__).resolve().parents[1])" 2>/dev/null)" \
        != "$(pwd -P)" ]; then
  echo "setup: building csrc/ and installing r1mega (editable) with its test tools"
  pip_install -e ".[dev]"
  echo "$digest" > "$stamp_dir/digest"
fi
