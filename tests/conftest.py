"""Test-suite wiring: the Triton interpreter on CPU, the `gpu` marker, and 'no test ran' = failure."""

from __future__ import annotations

import pytest
import torch

from r1mega.utils.triton_env import use_interpreter_without_cuda

# Before any test module imports a kernel module (see r1mega.utils.triton_env).
use_interpreter_without_cuda()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    # A run where everything was skipped or deselected must not look green in CI.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and exitstatus == 0 and not reporter.stats.get("passed"):
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
