"""`r1mega train` under torchrun on gloo: TP2, EP2, PP2 and DP2 reproduce the single-process run's
first step (rewards exactly: the engines sample the same completions; loss and KL within fp32
rounding) and train on without error.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.trainer_helpers import SMALL, metrics, run_env, train

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp2": ["parallel.tp=2"], "ep2": ["parallel.ep=2"], "pp2": ["parallel.pp=2"], "dp2": []}
STEP_SETS = ["run.steps=2", "run.save_every=0", "run.eval_max_prompts=2", "run.eval_samples=1"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_base_model):
    out = tmp_path_factory.mktemp("single")
    train(out, "one", small_base_model, *STEP_SETS)
    return metrics(out / "one")


def _torchrun_train(out, name, small_base_model, sets):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "r1mega.cli",
            "train", "--quiet", "--model", str(small_base_model)]
    for s in [f"run.out_dir={out}", f"run.name={name}", *SMALL, *STEP_SETS, *sets]:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, env=run_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return metrics(out / name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_reproduces_the_first_step(tmp_path, small_base_model, single, layout):
    rows = _torchrun_train(tmp_path, layout, small_base_model, LAYOUTS[layout])
    assert [r["step"] for r in rows] == [0, 1]
    got, want = rows[0], single[0]
    print(f"{layout}: reward {got['reward_mean']:.9g} vs {want['reward_mean']:.9g}, loss {got['loss']:.9g} vs "
          f"{want['loss']:.9g}, grad_norm {got['grad_norm']:.9g} vs {want['grad_norm']:.9g}, "
          f"kl {got['kl_mean']:.3g}, mismatch {got['mismatch_abs_max']:.3g}")
    # At ratio 1, with every response cut at max_new_tokens, the token-mean loss is the mean of
    # group-normalised advantages: zero up to rounding (exactly 0.0 on some CPUs). The gradient is
    # what carries the step, so it is what must be there to compare.
    assert want["grad_norm"] > 0.0 and want["reward_mean"] > 0.0, want  # something to compare
    assert got["reward_mean"] == want["reward_mean"] and got["response_length_mean"] == want["response_length_mean"]
    assert math.isclose(got["loss"], want["loss"], rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=1e-4)
    assert got["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and abs(got["kl_mean"]) < 1e-6
    assert got["mismatch_abs_max"] < 1e-4
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    summary = json.loads((tmp_path / layout / "summary.json").read_text())
    assert summary["steps"] == 2
