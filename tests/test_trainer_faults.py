"""Faults in the training loop, each on the CPU trainer run as a user runs it (a subprocess):
SIGTERM (finish the step, save, exit 0), the rollout engine raising mid-generate, a full disk
during a save, a reward worker killed mid-batch. In every case nothing already saved is lost and
the resumed run's metrics and final export equal the uninterrupted run's (tests/conftest.py's
`uninterrupted_run`). SIGKILL during a save and a damaged newest checkpoint are in
tests/test_trainer.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.trainer_helpers import REPO, SMALL, deterministic, metrics, run_env, train

FAULTY = REPO / "tests" / "workers" / "faulty_train.py"


def _args(out: Path, name: str, model: Path, *sets: str) -> list[str]:
    args = ["train", "--quiet", "--model", str(model)]
    for s in [f"run.out_dir={out}", f"run.name={name}", *SMALL, "run.steps=3", *sets]:
        args += ["--set", s]
    return args


def _checkpoint_steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _assert_resumes_to_the_uninterrupted_run(out: Path, name: str, model: Path, whole: Path) -> None:
    train(out, name, model, "run.steps=3", resume=True)
    run = out / name
    assert [r["step"] for r in metrics(run)] == [0, 1, 2]
    assert deterministic(metrics(run)) == deterministic(metrics(whole))
    assert (run / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()


def test_sigterm_finishes_the_step_saves_and_exits_0_then_resumes_exactly(tmp_path, small_base_model,
                                                                           uninterrupted_run):
    # no periodic saves: the checkpoint that exists afterwards is the one SIGTERM made
    proc = subprocess.Popen([sys.executable, "-m", "r1mega.cli", *_args(tmp_path, "term", small_base_model,
                                                                         "run.save_every=0")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=run_env())
    run = tmp_path / "term"
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # during step 1 (or the end of step 0)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = len(metrics(run))
    assert stopped in (1, 2), stderr[-3000:]
    assert f"stopped by SIGTERM after step {stopped} of 3" in stderr and "--resume" in stderr, stderr[-3000:]
    assert _checkpoint_steps(run) == ["latest", f"step_{stopped:08d}"]
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    _assert_resumes_to_the_uninterrupted_run(tmp_path, "term", small_base_model, uninterrupted_run)


def _faulty(fault: str, out: Path, name: str, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAULTY), fault, str(out / name), "--",
                           *_args(out, name, model)], capture_output=True, text=True, env=run_env(), timeout=600)


def test_a_rollout_engine_failing_mid_generate_stops_with_one_line_and_resumes(tmp_path, small_base_model,
                                                                               uninterrupted_run):
    proc = _faulty("engine-after-save:1", tmp_path, "engine", small_base_model)
    run = tmp_path / "engine"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines[-1].startswith("r1mega: error: step 1 failed (RuntimeError: injected fault: the rollout engine "
                                "failed mid-generate); the newest checkpoint is step 1: resume with"), lines[-1]
    assert "injected fault" in (run / "error.log").read_text()  # the traceback, for whoever debugs it
    assert _checkpoint_steps(run) == ["latest", "step_00000001"]
    _assert_resumes_to_the_uninterrupted_run(tmp_path, "engine", small_base_model, uninterrupted_run)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, small_base_model, uninterrupted_run):
    proc = _faulty("enospc-at-save:2", tmp_path, "full", small_base_model)
    run = tmp_path / "full"
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith("r1mega: error: step 1 failed (CheckpointError: save_checkpoint: writing step_00000002 "
                           "failed on rank 0") and "No space left on device" in last, last
    assert "the previous checkpoint is intact" in last and "the newest checkpoint is step 1" in last, last
    # the unfinished save is gone (its space given back), step 1 and `latest` are as they were
    assert _checkpoint_steps(run) == ["latest", "step_00000001"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001\n"
    _assert_resumes_to_the_uninterrupted_run(tmp_path, "full", small_base_model, uninterrupted_run)


def test_a_reward_worker_killed_mid_batch_changes_nothing(tmp_path, small_base_model, uninterrupted_run):
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**run_env(), "R1MEGA_TEST_MARKER_DIR": str(markers)}
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli",
                           *_args(tmp_path, "killed", small_base_model,
                                  "rewards.custom=tests.rewards_custom:killed_once_digit_share")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (markers / "killed").exists()  # a worker did die mid-batch
    run = tmp_path / "killed"
    assert sum(r["reward_errors"] for r in metrics(run)) == 0
    assert deterministic(metrics(run)) == deterministic(metrics(uninterrupted_run))
    assert (run / "final/model.safetensors").read_bytes() == \
        (uninterrupted_run / "final/model.safetensors").read_bytes()
