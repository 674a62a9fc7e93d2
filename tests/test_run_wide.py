"""The test run's own wiring: fixtures shared by the parallel workers are built once, and the two
passes of launchers/test.sh (`--part shared`, `--part alone`) split the suite without overlap."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import run_wide

REPO = Path(__file__).resolve().parents[1]


class _Factory:
    def __init__(self, base: Path):
        self.base = base

    def getbasetemp(self) -> Path:
        return self.base


@pytest.mark.parametrize("worker", [None, "gw1"])
def test_a_shared_fixture_is_built_once_however_many_workers_ask(tmp_path, monkeypatch, worker):
    monkeypatch.setattr(run_wide, "XDIST_WORKER", worker)
    base = tmp_path / "popen-gw1"
    base.mkdir()
    builds = []

    def build(out: Path) -> Path:
        builds.append(out)
        out.mkdir()
        (out / "model").write_text("weights")
        return out / "model"

    results = []
    threads = [threading.Thread(target=lambda: results.append(run_wide.built_once(_Factory(base), "m", build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared = tmp_path if worker else base  # a worker builds in the run's common directory
    assert builds == [shared / "m"] and results == [shared / "m" / "model"] * 4


def _collected(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_throughput_regression.py", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_the_two_parts_split_the_suite_and_the_default_runs_both():
    everything, shared, alone = _collected(), _collected("--part", "shared"), _collected("--part", "alone")
    assert alone == {"tests/test_throughput_regression.py::test_no_phase_of_the_grpo_step_is_slower_than_its_baseline"}
    assert shared and not shared & alone and shared | alone == everything
