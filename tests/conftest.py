"""Test-suite wiring: the Triton interpreter on CPU, the `gpu` marker, and 'no test ran' = failure."""

from __future__ import annotations

import os
import random

import pytest
import torch

from r1mega.utils.triton_env import interpreter_on, use_interpreter_without_cuda

# Before any test module imports a kernel module (see r1mega.utils.triton_env).
use_interpreter_without_cuda()


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed (or R1MEGA_TEST_SEED), printed for replay on failure."""
    seed = int(os.environ.get("R1MEGA_TEST_SEED", random.randrange(2**31)))
    print(f"R1MEGA_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Every tiny Hugging Face fixture model (tests/models_fixtures.py), built once per session."""
    from tests.models_fixtures import build_fixture_set

    return build_fixture_set(tmp_path_factory.getbasetemp() / "tiny-hf-models")


@pytest.fixture(scope="session")
def small_base_model(tmp_path_factory):
    """The embedded default's base model made the same way, pretrained for 40 steps (seconds)."""
    from r1mega.trainer.pretrain import PretrainSpec, pretrain_base_model

    return pretrain_base_model(tmp_path_factory.getbasetemp() / "small-base-model",
                               PretrainSpec(steps=40, batch_size=8), progress=False)


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, small_base_model):
    """A 3-step run of tests/trainer_helpers.SMALL, never interrupted: what every fault test's
    resumed run must equal (metrics, timings aside, and the final export)."""
    from tests.trainer_helpers import train

    out = tmp_path_factory.getbasetemp() / "uninterrupted"
    train(out, "whole", small_base_model, "run.steps=3")
    return out / "whole"


@pytest.fixture(autouse=True)
def _runnable_backend(request):
    # On a CUDA machine the interpreter stays off: Triton cannot take CPU tensors there.
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec else {}
    if params.get("backend") == "triton" and params.get("device", "cpu") == "cpu" and not interpreter_on():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


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
