"""A run whose data has code records refuses to start, in one line saying what to install, when
no sandbox backend works (instead of losing every code sample)."""

from __future__ import annotations

import json

import pytest

from r1mega.rewards import sandbox


def test_require_backend_names_each_failure_and_what_to_install():
    with pytest.raises(sandbox.SandboxUnavailable) as err:
        sandbox.require_backend(python="/nonexistent/python3")
    message = str(err.value)
    assert "\n" not in message and sandbox.INSTALL_HINT in message
    assert all(f"{b}:" in message for b in sandbox.BACKENDS)


def test_require_backend_returns_a_working_one():
    available = sandbox.available_backends()
    if not available:
        pytest.skip("no sandbox backend on this machine")
    assert sandbox.require_backend() == available[0]


def test_a_run_with_code_records_refuses_to_start_without_a_sandbox(tmp_path, monkeypatch, small_base_model):
    from r1mega.config import Config
    from r1mega.trainer.inputs import TrainError, resolve_inputs

    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"id": "c1", "prompt": "Print 1.", "task": "code",
                                "tests": [{"input": "", "output": "1"}]}) + "\n")
    cfg = Config().with_values({"run.data": str(data), "run.model": str(small_base_model),
                                "batch.prompts_per_step": 1, "rollout.max_new_tokens": 64})

    def unavailable(python=None):
        raise sandbox.SandboxUnavailable(f"no code sandbox works on this machine (...); {sandbox.INSTALL_HINT}")

    monkeypatch.setattr(sandbox, "require_backend", unavailable)
    with pytest.raises(TrainError) as err:
        resolve_inputs(cfg)
    assert str(data) in str(err.value) and "bubblewrap" in str(err.value) and "\n" not in str(err.value)
    # without the accuracy reward nothing runs code: no sandbox needed
    resolve_inputs(cfg.with_values({"rewards.accuracy_weight": 0.0}))


def test_eval_of_code_problems_refuses_to_start_without_a_sandbox(monkeypatch, small_base_model):
    from r1mega.data.records import PromptRecord
    from r1mega.evaluation import EvalError, evaluate_model

    def unavailable(python=None):
        raise sandbox.SandboxUnavailable(f"no code sandbox works on this machine (...); {sandbox.INSTALL_HINT}")

    monkeypatch.setattr(sandbox, "require_backend", unavailable)
    record = PromptRecord(id="c1", prompt="Print 1.", task="code", tests=({"input": "", "output": "1"},))
    with pytest.raises(EvalError) as err:
        evaluate_model(small_base_model, [record], progress=False)
    assert "bubblewrap" in str(err.value) and "\n" not in str(err.value)


def test_rejection_sampling_of_code_prompts_refuses_to_start_without_a_sandbox(tmp_path, monkeypatch, small_base_model):
    from r1mega.data.records import PromptRecord
    from r1mega.rejection import rejection_sample

    def unavailable(python=None):
        raise sandbox.SandboxUnavailable(f"no code sandbox works on this machine (...); {sandbox.INSTALL_HINT}")

    monkeypatch.setattr(sandbox, "require_backend", unavailable)
    record = PromptRecord(id="c1", prompt="Print 1.", task="code", tests=({"input": "", "output": "1"},))
    with pytest.raises(ValueError, match="bubblewrap"):
        rejection_sample(small_base_model, [record], tmp_path / "out.jsonl", progress=False)
    assert not (tmp_path / "out.jsonl").exists()
