"""Running `r1mega train` as a user does (a subprocess) for the trainer tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from r1mega.run.logs import is_timing

SMALL = ["run.steps=2", "run.eval_every=0", "run.eval_max_prompts=6", "run.eval_samples=2", "run.save_every=1",
         "batch.prompts_per_step=4", "grpo.group_size=4", "rollout.max_new_tokens=24", "rewards.workers=1",
         "run.samples_per_step=3",
         # a dense reward: the barely pretrained test base scores 0 on accuracy and format, and a run
         # whose every reward is equal would train nothing (zero advantages) and compare nothing
         "rewards.custom=tests.rewards_custom:digit_share"]


REPO = Path(__file__).resolve().parents[1]


def run_env() -> dict[str, str]:
    """The environment of a test's `r1mega` process: one thread, no compile, and the repository on
    the path so that rewards.custom can name tests.rewards_custom from any working directory."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def r1mega(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = run_env()
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def train(out: Path, name: str, model: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    args = ["train", "--quiet"]
    if resume:
        args += ["--resume", str(out / name)]
    else:
        args += ["--model", str(model)]
    for s in [f"run.out_dir={out}", f"run.name={name}", *SMALL, *sets]:
        args += ["--set", s]
    proc = r1mega(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in rows]


