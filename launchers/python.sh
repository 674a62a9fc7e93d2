# Sourced by the launchers: sets PY to the Python to install into and run with.
#   - $PYTHON when given, else python3;
#   - when that Python refuses `pip install` (PEP 668: an "externally managed" system Python,
#     outside any virtual environment), a virtual environment in .venv/ is made (once) and used.
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && "$PY" - <<'PYCHECK' 2>/dev/null
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and not in_venv else 1)
PYCHECK
then
  if [ ! -x .venv/bin/python ]; then
    echo "setup: this Python refuses pip installs (PEP 668); making a virtual environment in .venv/"
    "$PY" -m venv .venv
  fi
  echo "setup: using the virtual environment in .venv/ (activate it with: source .venv/bin/activate)"
  PY=.venv/bin/python
fi
export PYTHON=$PY
