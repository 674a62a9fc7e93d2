"""What the test run's parallel workers share.

launchers/test.sh runs the suite in pytest-xdist workers, one per core. A worker's own torch work
takes one thread (tests/conftest.py), as the subprocesses the tests start do (OMP_NUM_THREADS=1),
so that the workers do not fight over the cores; and a model that several test files need is built
once for the whole run, not once per worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

# "gw0", "gw1", ... in a pytest-xdist worker; None in a plain pytest run.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(dir)` once for the whole run, and the path it returned. Under pytest-xdist the workers
    share one copy in the run's common temporary directory: the first to ask builds it under a
    file lock, the others wait for it instead of building their own."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if XDIST_WORKER else root
    done = root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(str(build(root / name)))
    return Path(done.read_text())
