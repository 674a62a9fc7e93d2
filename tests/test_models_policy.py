"""The Policy API on CPU under torchrun (gloo), tiny random DeepSeek-V3 / Qwen3-MoE / Qwen2 models.

One TP1 reference job (log-probs vs transformers, a 3-step GRPO trajectory, a checkpoint after step
1, the bucket stream vs the HF export), then one job per world size that runs every layout in turn
(re-initialising megatron's groups) and compares with the reference: log-probs, the trajectory
(losses, grad norms, final log-probs and parameters), resuming the TP1 checkpoint (and the
previous layout's) in this layout, and the bucket stream vs its own HF export. DeepSeek-V3 (MLA +
MoE) runs the whole matrix; Qwen3-MoE and Qwen2 fewer layouts.

Why adam_eps=1e-3 in the recipe (tests/workers/_policy_common.py): Adam's update is nearly
lr * sign(g) for |g| >> eps, so an element whose gradient is zero up to cancellation flips
between +-lr across layouts (different summation orders); measured with eps=1e-8: single
elements off by 2*lr (per-tensor max relative 4.6e-4) while losses and log-probs agreed to 2e-7.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from r1mega.models.checkpoint import (
    LATEST_NAME,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
)
from tests.torchrun import WORKERS, run_torchrun
from tests.workers._policy_common import DATA_STATE, REL_TOL, RESUME_AT, STEPS

pytestmark = pytest.mark.distributed

TWO_RANKS = ("ds-tp2", "ds-ep2", "ds-pp2", "qwen3-ep2", "qwen2-pp2")
FOUR_RANKS = ("ds-tp2ep2", "ds-tp2pp2", "qwen3-tp2", "qwen2-tp2")
NUMBER = r"([0-9.e+-]+|nan|inf)"


@pytest.fixture(scope="session")
def policy_reference(tiny_models, tmp_path_factory):
    """(output dir, stdout) of the TP1 reference job."""
    out = tmp_path_factory.mktemp("policy")
    stdout = run_torchrun("models_policy.py", 1, "reference", str(tiny_models), str(out))
    return out, stdout


@pytest.fixture(scope="session")
def killed_checkpoint(policy_reference):
    """Resume the DeepSeek-V3 reference checkpoint, train a step and SIGKILL the process while it
    saves step 2 (after its weights are written, before the checkpoint is published).
    Returns (the checkpoint root, the job's output)."""
    out, _ = policy_reference
    marker = out / "kill-marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKERS / "models_policy.py"), "kill", str(out), "deepseek_v3",
                             str(marker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the save job exited ({proc.returncode}) before it was killed:\n"
                                     f"{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the save job never reached its weights-written point")
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out / "ckpt-deepseek_v3", proc.stdout.read()


def _layouts(stdout: str, names) -> dict[str, dict[str, float]]:
    found = {}
    for name in names:
        match = re.search(rf"^layout {name} parity {NUMBER} logp0 {NUMBER} losses {NUMBER} grad_norms {NUMBER} "
                          rf"final_logp {NUMBER} params {NUMBER} buckets (\d+) largest (\d+)", stdout, re.M)
        assert match, f"no result for layout {name}:\n{stdout}"
        keys = ("parity", "logp0", "losses", "grad_norms", "final_logp", "params", "buckets", "largest")
        found[name] = dict(zip(keys, map(float, match.groups())))
    return found


def _check_layouts(stdout: str, names) -> None:
    for name, result in _layouts(stdout, names).items():
        assert result["parity"] <= 2e-5, (name, result)  # vs transformers, fp32 rounding
        for key in ("logp0", "losses", "grad_norms", "final_logp", "params"):
            assert result[key] <= REL_TOL, (name, key, result)  # vs TP1
        assert result["buckets"] > 1, (name, result)
        assert f"export {name} ok" in stdout, stdout
        resumes = re.findall(rf"^resume {name} from (\S+) losses {NUMBER} final_logp {NUMBER} params {NUMBER} "
                             r"rng (\S+)", stdout, re.M)
        assert resumes and resumes[0][0] == "tp1", (name, stdout)
        for source, *diffs, rng in resumes:
            assert all(float(d) <= REL_TOL for d in diffs), (name, source, diffs)
            assert rng == "reseeded", (name, source, rng)  # another layout: RNG is re-seeded


def test_train_step_matches_transformers_autograd(policy_reference):
    """The first step's loss and gradient norm equal transformers' model under plain autograd with
    r1mega.algo.policy_loss (a check no layout comparison can pass by accident)."""
    check_train_step_lines(policy_reference[1])


def check_train_step_lines(output: str) -> None:
    print("\n".join(line for line in output.splitlines()
                    if line.startswith(("train_step vs", "token budget", "logits head", "variant"))))
    for family in ("deepseek_v3", "qwen3_moe", "qwen2"):
        assert f"train_step vs transformers autograd {family} " in output, output
        # the same step on token-budget micro-batches (rows of unequal length packed together)
        assert re.search(rf"^token budget \d+ {family} ", output, re.M), output
        assert f"logits head {family} " in output, output
        # the THD packed format and (MoE) grouped-GEMM experts: the same step
        for variant in ("thd",) + (("grouped", "grouped+thd") if family != "qwen2" else ()):
            assert f"variant {variant} {family} " in output, output


def test_tp1_logprobs_match_transformers_and_buckets_equal_export(policy_reference):
    check_tp1_lines(policy_reference[1])


def check_tp1_lines(stdout: str) -> None:
    for family in ("deepseek_v3", "qwen3_moe", "qwen2"):
        assert f"round trip {family} ok" in stdout, stdout  # HF -> policy -> HF, bit for bit
        diff = re.search(rf"^parity {family} tp1 max_abs_diff {NUMBER}$", stdout, re.M)
        assert diff and float(diff.group(1)) <= 2e-5, stdout
        assert re.search(rf"^buckets {family} tp1 ok count=\d+", stdout, re.M), stdout
        losses = re.search(rf"^trajectory {family} tp1 losses (.*) grad_norms (.*)$", stdout, re.M)
        assert losses and len(losses.group(1).split()) == STEPS, stdout
        values = [float(x) for x in losses.group(1).split()]
        assert values[-1] < values[0], values  # the GRPO loss goes down on a fixed batch
    assert re.search(rf"^bf16 ok max_abs_diff_vs_fp32 {NUMBER}$", stdout, re.M), stdout
    assert re.search(rf"^converted qwen2 ok max_abs_diff {NUMBER}$", stdout, re.M), stdout
    assert "refused bad batches: left padding, t=0 in the loss, unknown key, missing key, norm_length, shape" \
        in stdout, stdout


def test_killed_save_leaves_the_previous_checkpoint(killed_checkpoint):
    root, output = killed_checkpoint
    assert "rng restored" in output, output  # the job resumed in the layout it was saved in
    names = sorted(p.name for p in root.iterdir())
    leftovers = [n for n in names if re.fullmatch(r"step_00000002\.tmp-[0-9a-f]+", n)]
    assert leftovers, names  # it was killed mid-save: its weights were written, not published
    assert any((root / leftovers[0] / "weights").iterdir())
    assert "step_00000002" not in names, names
    assert (root / LATEST_NAME).read_text() == f"step_{RESUME_AT:08d}\n"
    step_dir = resolve_checkpoint(root)
    assert step_dir.name == f"step_{RESUME_AT:08d}"
    meta = read_meta(step_dir)
    assert meta["step"] == RESUME_AT and meta["data_state"] == DATA_STATE
    assert [step for step, _ in list_checkpoints(root)] == [RESUME_AT]


def test_bad_saves_are_refused_and_keep_last_prunes(policy_reference):
    check_save_lines(policy_reference[1])


def check_save_lines(output: str) -> None:
    assert "refused data_state nan: save_checkpoint: data_state must be a JSON-safe dict" in output, output
    assert "refused data_state object" in output and "refused data_state list" in output, output
    assert re.search(r"^refused existing step: save_checkpoint: .*step_\d+ already exists", output, re.M), output
    assert "keep_last ok" in output, output


@pytest.mark.gpu
def test_reference_job_on_cuda(tiny_models, tmp_path):
    """The TP1 reference job with the policy, transformers' model and the checks on the GPU (nccl,
    world 1): round trip, log-probs, the first step vs transformers' autograd, the trajectory,
    checkpoints, bf16, the bucket stream vs the export."""
    stdout = run_torchrun("models_policy.py", 1, "reference", str(tiny_models), str(tmp_path),
                          env={"R1MEGA_TEST_DEVICE": "cuda"}, timeout_s=400)
    assert "device cuda" in stdout, stdout
    check_train_step_lines(stdout)
    check_tp1_lines(stdout)
    check_save_lines(stdout)


def test_two_rank_layouts_match_tp1(policy_reference, killed_checkpoint, tiny_models):
    """TP2, EP2 (dp 2), PP2 for DeepSeek-V3; Qwen3-MoE EP2; Qwen2 PP2 (tied embeddings across stages).

    DeepSeek-V3 resumes from the checkpoint directory whose step-2 save was killed: it gets step 1."""
    out, _ = policy_reference
    stdout = run_torchrun("models_policy.py", 2, "layouts", str(tiny_models), str(out), *TWO_RANKS, timeout_s=400)
    _check_layouts(stdout, TWO_RANKS)
    # each layout also resumed from the previous layout's checkpoint of its family (EP2 <- TP2, PP2 <- EP2)
    assert re.search(r"^resume ds-ep2 from ds-tp2 ", stdout, re.M) and re.search(r"^resume ds-pp2 from ds-ep2 ",
                                                                                  stdout, re.M), stdout


def test_four_rank_layouts_match_tp1(policy_reference, tiny_models):
    """TP2xEP2 and TP2xPP2 for DeepSeek-V3; TP2 x DP2 for Qwen3-MoE and Qwen2."""
    out, _ = policy_reference
    stdout = run_torchrun("models_policy.py", 4, "layouts", str(tiny_models), str(out), *FOUR_RANKS, timeout_s=500)
    _check_layouts(stdout, FOUR_RANKS)
    assert RESUME_AT < STEPS
