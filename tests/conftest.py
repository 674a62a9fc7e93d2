"""Test-suite wiring: the Triton interpreter on CPU, the `gpu`, `slow` and `alone` markers, the
parallel run's two parts and shared fixtures, and 'no test ran' = failure."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

from r1mega.utils.triton_env import interpreter_on, use_interpreter_without_cuda
from tests.run_wide import XDIST_WORKER, built_once

# Before any test module imports a kernel module (see r1mega.utils.triton_env).
use_interpreter_without_cuda()

# launchers/test.sh runs the suite in pytest-xdist workers, one per core (tests/run_wide.py).
if XDIST_WORKER:
    torch.set_num_threads(1)


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

    return built_once(tmp_path_factory, "tiny-hf-models", build_fixture_set)


@pytest.fixture(scope="session")
def small_base_model(tmp_path_factory):
    """The embedded default's base model made the same way, pretrained for 40 steps (seconds) in a
    one-thread process: the same bits on any machine's core count (the golden metrics' base)."""
    from tests.golden_metrics import build_base

    return built_once(tmp_path_factory, "small-base-model", build_base)


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, small_base_model):
    """A 3-step run of tests/trainer_helpers.SMALL, never interrupted: what every fault test's
    resumed run must equal (metrics, timings aside, and the final export)."""
    from tests.trainer_helpers import train

    def run(out: Path) -> Path:
        train(out, "whole", small_base_model, "run.steps=3")
        return out / "whole"

    return built_once(tmp_path_factory, "uninterrupted", run)


@pytest.fixture(autouse=True)
def _runnable_backend(request):
    # On a CUDA machine the interpreter stays off: Triton cannot take CPU tensors there.
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec else {}
    if params.get("backend") == "triton" and params.get("device", "cpu") == "cpu" and not interpreter_on():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


# The fast lane, `-m "not slow"`: what is `slow` is decided here, in one place. Every `distributed`
# test is slow (torchrun worker processes), and so is every test that uses the `uninterrupted_run`
# fixture (a whole training run), plus the modules and tests below: whole runs of r1mega (a
# subprocess `r1mega train/sft/sample/distill/eval/...`), the golden metrics and the throughput gate,
# then what `--durations` of the fast lane still showed as its heaviest.
SLOW_MODULES = {
    "test_golden_metrics.py",  # the tiny recipe, two loss variants and SFT, reproduced in subprocesses
    "test_trainer_faults.py",  # killed / failing runs resumed to the uninterrupted run
    # the heaviest of what a second --durations of the fast lane showed (quiet machine, 322 s in all):
    "test_fuzz.py",  # property-based campaigns over configs, HF configs and row files (59 s)
    "test_launchers.py",  # dry runs that build megatron's groups in launcher subprocesses (31 s)
    "test_sandbox_hostile.py",  # hostile programs in real sandboxes, both backends (13 s)
    "test_gpu_check.py",  # gpu_check.py in subprocesses (10 s)
}
SLOW_TESTS = {
    # whole runs of the CLI
    "test_trainer.py::test_train_runs_and_writes_the_run_directory",
    "test_trainer.py::test_a_killed_run_resumes_bit_for_bit",
    "test_trainer.py::test_a_reward_that_crashes_or_hangs_costs_its_sample_not_the_run",
    "test_trainer.py::test_a_damaged_newest_checkpoint_resumes_from_the_previous",
    "test_trainer.py::test_grouped_experts_and_thd_train_like_the_default_layout",
    "test_trainer.py::test_old_logprobs_from_the_rollout_skip_the_recompute_and_take_the_same_step",
    "test_sft.py::test_sft_runs_learns_and_resumes_bit_for_bit",
    "test_distill.py::test_r1mega_distill_end_to_end_and_resumed",
    "test_rejection.py::test_r1mega_sample_end_to_end_with_a_judge",
    "test_rm.py::test_cli_trains_on_a_pair_file_and_prints_the_table",
    "test_evaluation.py::test_r1mega_eval_end_to_end_and_greedy_equals_transformers",
    "test_evaluation.py::test_trainer_heldout_evaluation_equals_r1mega_eval",
    "test_routing.py::test_one_grpo_run_over_mixed_prompts",
    # the throughput gate: measures the GRPO step in fresh processes (and skips on a noisy machine)
    "test_throughput_regression.py::test_no_phase_of_the_grpo_step_is_slower_than_its_baseline",
    # torchrun jobs not marked distributed (22-32 s each in the fast lane's first measurement)
    "test_sft.py::test_packed_sft_step_matches_transformers_on_each_example_alone",
    "test_sft.py::test_packed_sft_in_tp2_and_pp2_matches_transformers",
    "test_sft.py::test_packed_sft_in_thd_format_matches_transformers",
    # a reward model trained 4 epochs in its fixture (93 s setup there), and one CLI process per bad
    # SFT row (8-11 s each, 9 cases)
    "test_rm.py::test_embedded_pairs_train_well_above_chance_and_reward_model_scores_what_was_trained",
    "test_sft.py::test_a_bad_sft_row_stops_with_one_line_naming_file_row_and_field",
    # the reward model's 4-epoch fixture again (44 s), one CLI process per bad pair (3 s each)
    "test_rm.py::test_pair_tokens_are_reward_models_with_and_without_a_chat_template",
    "test_rm.py::test_a_bad_pair_stops_the_cli_with_one_line_before_any_work",
    # peak-memory probes of the fused losses against eager (10-12 s each)
    "test_ops_linear.py::test_peak_memory_is_a_small_fraction_of_eager",
    "test_kernels_grpo_loss.py::test_torch_backend_peak_memory_stays_below_the_eager_reference",
    # reward workers killed with their children, or their trainer killed (3-5 s each)
    "test_rewards_pool.py::test_killed_worker_takes_its_children",
    "test_rewards_pool.py::test_spawn_context",
    "test_rewards_pool.py::test_workers_exit_when_the_trainer_is_killed",
    "test_pipeline.py::test_a_failing_command_names_the_stage_and_its_log",
}
# Fixtures that pretrain a model first (the 40-step base, the distillation student): 472 s of
# setup in the fast lane's first measurement (beside other test runs, load average 5-20), then a
# CLI process each (test_evaluation's flags 38 s, test_trainer's bad input 30 s, test_routing's
# refusal 21 s, test_models_te's fp8 refusal 11 s).
SLOW_FIXTURES = {"uninterrupted_run", "small_base_model", "small_student"}


def _is_slow(item) -> bool:
    module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    name = item.nodeid.split("::", 1)[-1].split("[", 1)[0]
    return ("distributed" in item.keywords or module in SLOW_MODULES or f"{module}::{name}" in SLOW_TESTS
            or bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))))


def pytest_addoption(parser):
    parser.addoption("--part", choices=("all", "shared", "alone"), default="all",
                     help="launchers/test.sh's two passes: 'shared' leaves out the tests marked `alone` "
                          "(they measure time; the other pass runs them with nothing beside them), "
                          "'alone' runs only those")


def _select_part(config, items) -> None:
    part = config.getoption("part")
    if part == "all":
        return
    keep = [item for item in items if ("alone" in item.keywords) == (part == "alone")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _select_part(config, items)
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    if importlib.util.find_spec("vllm") is None:
        skip_vllm = pytest.mark.skip(reason="needs vLLM: runs in the test command's vLLM lane (launchers/vllm_lane.sh)")
        for item in items:
            if "vllm" in item.keywords:
                item.add_marker(skip_vllm)
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


def pytest_terminal_summary(terminalreporter):
    # The figures a test records (record_property("figures", ...)): the measured differences a
    # reader of CI's log wants without rerunning with -s (pytest-xdist carries them to this process).
    lines = [f"{report.nodeid}: {value}"
             for key in ("passed", "failed") for report in terminalreporter.stats.get(key, [])
             for name, value in getattr(report, "user_properties", ()) if name == "figures"]
    if lines:
        terminalreporter.write_sep("-", "figures")
        for line in lines:
            terminalreporter.write_line(line)
