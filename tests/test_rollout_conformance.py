"""The rollout conformance suite for the `hf` engine: the policy in TP1, TP2, EP2 and PP2 (torchrun on
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_one_rank_layouts(tiny_models, device):
    """The policy and the hf engine on ``device`` (cuda: nccl, world 1; the engine on the same GPU).

    CUDA_VISIBLE_DEVICES="" makes the CPU variant a CPU run on a GPU machine as well."""
    env = {"R1MEGA_TEST_DEVICE": device, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    out = run_torchrun("rollout_conformance.py", 1, str(tiny_models), "ds-tp1", "qwen3-tp1", "qwen2-tp1", "offload",
                       "ds-tp1-thd", "qwen3-tp1-grouped-thd", timeout_s=400, env=env)
    assert f"device {device}" in out, out
    checks = _checks(out)
    _report(checks)
    for layout in ("ds-tp1", "qwen3-tp1", "qwen2-tp1", "ds-tp1-thd", "qwen3-tp1-grouped-thd"):
        assert float(checks[(layout, "logprob_diff")]) < 1e-4
        assert float(checks[(layout, "refit_logprob_diff")]) < 1e-4
        assert float(checks[(layout, "stale_logprob_diff")]) > 1e-2
        assert checks[(layout, "stream_plans")] == "1"
    for layout in ("ds-tp1", "qwen3-tp1", "ds-tp1-thd", "qwen3-tp1-grouped-thd"):
        assert float(checks[(layout, "replay_exact_diff")]) < 1e-4
        assert float(checks[(layout, "replay_on_diff")]) * 2 < float(checks[(layout, "replay_off_diff")])
    assert checks[("ds-tp1", "offload_bitwise")] == "ok"


def test_two_rank_layouts(tiny_models):
    layouts = ("ds-tp2", "ds-ep2", "ds-pp2", "qwen3-ep2", "ds-tp2-grouped-thd")
    out = run_torchrun("rollout_conformance.py", 2, str(tiny_models), *layouts, timeout_s=600)
    checks = _checks(out)
    _report(checks)
    for layout in layouts:
        assert float(checks[(layout, "logprob_diff")]) < 1e-4
        assert float(checks[(layout, "refit_logprob_diff")]) < 1e-4
        assert float(checks[(layout, "stale_logprob_diff")]) > 1e-2
        assert float(checks[(layout, "replay_exact_diff")]) < 1e-4
        assert float(checks[(layout, "replay_on_diff")]) * 2 < float(checks[(layout, "replay_off_diff")])
        assert checks[(layout, "stream_plans")] == "1"


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _has_vllm(), reason="needs vLLM (pip install -e '.[gpu]')")
@pytest.mark.parametrize("nproc, layout", [(1, "ds-tp1"), (1, "qwen3-tp1"), (1, "qwen2-tp1"), (2, "ds-tp2"),
                                           (2, "ds-ep2"), (2, "ds-pp2")])
def test_vllm_engine_layouts(tiny_models, nproc, layout):
    out = run_torchrun("rollout_conformance.py", nproc, str(tiny_models), layout, timeout_s=900,
                       env={"R1MEGA_TEST_ENGINE": "vllm"})
    checks = _checks(out)
    _report(checks)
    assert (layout, "refit_logprob_diff") in checks
