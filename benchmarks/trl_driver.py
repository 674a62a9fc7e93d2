"""TRL's side of ``bench_vs_trl.py``: one ``GRPOTrainer`` run, timed phase by phase.

    <trl venv>/bin/python benchmarks/trl_driver.py SPEC.json

Runs in the benchmark's TRL virtual environment (TRL 1.16; r1mega through
``--system-site-packages``). SPEC.json is written by ``trl_match.spec_file``: the settings,
r1mega's resolved config, the base model and the training prompts. The trainer gets
``trl_match.trl_config_kwargs(config)``, a dataset of the prompts in the order r1mega's sampler
hands them out (``shuffle_dataset=False``), and reward functions calling r1mega's rewards.

Timing, without changing TRL: methods of the trainer instance are wrapped and a callback marks the
optimizer step's bounds (HF ``Trainer``: ``on_step_begin`` -> ``training_step`` (TRL's
``_prepare_inputs`` generates and scores there) -> clip -> optimizer -> ``on_step_end``):

* rollout: ``_generate`` (tokenising the prompts, ``model.generate``, decoding);
* reward: ``_calculate_rewards``;
* logprobs: ``_get_per_token_logps_and_entropies`` without gradients (the reference model's
  log-probs; TRL skips the old-policy pass when one optimizer step follows each rollout);
* score_other: the rest of ``_generate_and_score_completions`` (padding, advantages, logging);
* train: the step's time after ``_prepare_inputs`` returned (loss forward with entropies,
  backward, gradient clipping, the optimizer and the LR schedule).

Writes OUT/trl_timings.json and the final model as a Hugging Face directory OUT/final.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl_match import (  # noqa: E402
    Settings,
    r1mega_hyperparameters,
    step_prompts,
    trl_config_kwargs,
    trl_hyperparameters,
    trl_reward_functions,
    trl_rows,
)


class StepClock:
    """Seconds per phase of each optimizer step and the tokens it generated and trained."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.step_start = self.prepared_at = 0.0
        self.prompt_texts: list[list[str]] = []

    def begin(self) -> None:
        self.current = {"rollout": 0.0, "reward": 0.0, "logprobs": 0.0, "prepare": 0.0, "optimizer": 0.0,
                        "prompt_tokens": 0, "completion_tokens": 0, "sequences": 0}
        self.step_start = self.prepared_at = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        if self.current is not None:
            self.current[phase] += seconds

    def end(self) -> None:
        now = time.perf_counter()
        c = self.current
        c["seconds"] = now - self.step_start
        c["train"] = now - self.prepared_at
        c["score_other"] = c["prepare"] - c["rollout"] - c["reward"] - c["logprobs"]
        self.steps.append(c)
        self.current = None


def instrument(trainer, clock: StepClock) -> None:
    """Wrap the trainer instance's phase methods with timers (the class and TRL stay untouched)."""
    import torch

    generate, rewards = trainer._generate, trainer._calculate_rewards
    logps, prepare = trainer._get_per_token_logps_and_entropies, trainer._prepare_inputs

    def timed_generate(prompts):
        t = time.perf_counter()
        out = generate(prompts)
        clock.add("rollout", time.perf_counter() - t)
        prompt_ids, completion_ids = out[0], out[1]
        clock.current["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        clock.current["completion_tokens"] += sum(len(c) for c in completion_ids)
        clock.current["sequences"] += len(completion_ids)
        clock.prompt_texts.append(list(prompts))
        return out

    def timed_rewards(*args, **kwargs):
        t = time.perf_counter()
        out = rewards(*args, **kwargs)
        clock.add("reward", time.perf_counter() - t)
        return out

    def timed_logps(*args, **kwargs):
        if torch.is_grad_enabled():  # the loss forward: part of the train phase
            return logps(*args, **kwargs)
        t = time.perf_counter()
        out = logps(*args, **kwargs)
        clock.add("logprobs", time.perf_counter() - t)
        return out

    def timed_prepare(batch):
        t = time.perf_counter()
        out = prepare(batch)
        clock.prepared_at = time.perf_counter()
        clock.add("prepare", clock.prepared_at - t)
        return out

    trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards
    trainer._get_per_token_logps_and_entropies, trainer._prepare_inputs = timed_logps, timed_prepare


def main(spec_path: str) -> int:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from r1mega.config import Config
    from r1mega.data import load_prompts
    from r1mega.templates import render_prompts
    from r1mega.utils.io import atomic_write_text

    wall = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    settings = Settings(**spec["settings"])
    torch.set_num_threads(settings.threads)
    cfg = Config().with_dict(spec["config"], source=spec_path)
    out_dir = Path(spec["out_dir"])
    records = load_prompts(spec["data"])
    steps = step_prompts(records, cfg)
    ordered = [r for batch in steps for r in batch]
    kwargs = trl_config_kwargs(cfg, output_dir=out_dir / "trainer")
    args = trl.GRPOConfig(**kwargs, disable_tqdm=True)
    if trl_hyperparameters(args) != r1mega_hyperparameters(cfg):  # what TRL made of the keywords
        diff = {k: (v, r1mega_hyperparameters(cfg)[k]) for k, v in trl_hyperparameters(args).items()
                if v != r1mega_hyperparameters(cfg)[k]}
        raise SystemExit(f"{spec_path}: GRPOConfig differs from r1mega's config (trl, r1mega): {diff}")
    funcs, weights = trl_reward_functions(cfg, records)
    args.reward_weights = weights
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["base_model"])
    rows = trl_rows(ordered, cfg.run.template)
    trl_ids = tokenizer(text=[r["prompt"] for r in rows])["input_ids"]
    if trl_ids != render_prompts(ordered, tokenizer, cfg.run.template, cfg.rollout.max_prompt_tokens):
        raise SystemExit("TRL tokenizes the prompts differently from r1mega (special tokens?)")

    clock = StepClock()

    class Marks(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.begin()

        def on_pre_optimizer_step(self, *a, **k):
            self.t = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            clock.add("optimizer", time.perf_counter() - self.t)

        def on_step_end(self, *a, **k):
            clock.end()

    trainer = trl.GRPOTrainer(model=spec["base_model"], reward_funcs=funcs, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Marks()])
    instrument(trainer, clock)
    setup_s = time.perf_counter() - wall
    trainer.train()
    final = out_dir / "final"
    trainer.save_model(str(final))
    expected = [[rows[i]["prompt"] for i in range(k * cfg.batch.prompts_per_step, (k + 1) * cfg.batch.prompts_per_step)
                 for _ in range(cfg.grpo.group_size)] for k in range(cfg.run.steps)]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    result = {
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "grpo_config": {k: v for k, v in args.to_dict().items() if k in kwargs or k == "reward_weights"},
        "prompts_as_r1mega": clock.prompt_texts == expected,
        "steps": clock.steps, "setup_s": setup_s, "final_model": str(final),
        "train_reward": [h["reward"] for h in logs],
        "train_accuracy": [h.get("rewards/accuracy/mean") for h in logs],
        "process_wall_s": time.perf_counter() - wall,
    }
    atomic_write_text(out_dir / "trl_timings.json", json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
