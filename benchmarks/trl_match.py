"""What makes a TRL ``GRPOTrainer`` run the same job as ``r1mega train``: one settings object, the
r1mega config it gives, the ``GRPOConfig`` keywords derived from that config, the prompts in the
order r1mega's sampler hands them out, and TRL reward functions that call r1mega's own rewards.

Imported by ``bench_vs_trl.py`` (r1mega's interpreter) and by ``trl_driver.py`` (the benchmark's
TRL virtual environment, which sees r1mega through ``--system-site-packages``); it imports neither
TRL nor anything heavier than r1mega's config, data and rewards, so both sides read the same code.

The loss both sides compute (TRL 1.16 ``loss_type="grpo"``, read from ``trl/trainer/grpo_trainer.py``
``_compute_loss``; r1mega's README "Reproducing verl and TRL"): per-token
``-min(r A, clip(r, 1 - 0.2, 1 + 0.2) A) + beta * k3``, averaged over each sequence's completion
tokens, then over sequences; A = (r - mean_group) / (std_group + 1e-4) with the Bessel-corrected
std; no truncated importance sampling (TRL has none without vLLM), no router auxiliary loss
(r1mega's MoE trains without one; TRL would take Qwen3-MoE's 0.001 unless told 0).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from r1mega.config import Config
from r1mega.data.records import PromptRecord

# TRL's loss_type -> the r1mega aggregation that equals it (the README's mapping table).
TRL_LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                "dapo": "token-mean"}
TRL_LOSS_TYPE = "grpo"


@dataclass(frozen=True)
class Settings:
    """The knobs of one comparison; everything else is the ``tiny`` recipe's."""

    steps: int = 60  # the tiny recipe's run.steps
    prompts: int = 8  # prompts per step
    group: int = 8  # completions per prompt (G)
    max_new_tokens: int = 48
    seed: int = 0
    # One thread per side: on this shared 2-core machine two OpenMP threads made single steps swing
    # from 0.9 s to 50 s whenever another job ran (measured, 2026-12-05); one thread keeps both steady.
    threads: int = 1
    heldout_prompts: int = 200
    eval_samples: int = 4
    # The ratio's old log-probs. TRL (no vLLM, one optimizer step per generation) takes the current
    # policy's own, detached, from the loss forward: no extra pass. r1mega's like-for-like choice is
    # grpo.old_logp=rollout, the hf engine's fp32 log-probs (equal to the trainer's to ~1e-6);
    # "recompute" adds the policy forward that verl and NeMo-RL run by default.
    old_logp: str = "rollout"

    def __post_init__(self) -> None:
        for name in ("steps", "prompts", "group", "max_new_tokens", "threads", "heldout_prompts", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 1")
        if self.group < 2:
            raise ValueError(f"--group: {self.group} must be >= 2 (TRL refuses a group of one)")
        if self.old_logp not in ("rollout", "recompute"):
            raise ValueError(f"--old-logp: {self.old_logp!r} must be rollout or recompute")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def r1mega_config(s: Settings, *, out_dir: str | Path, name: str, data: str | Path) -> Config:
    """The ``tiny`` recipe with the comparison's sizes and the loss set to TRL's ``grpo``.

    ``data`` holds the embedded task's training prompts (so the held-out split is not evaluated
    during training: both final models are evaluated afterwards by the same code)."""
    from r1mega.recipes import get_recipe

    trl_loss = get_recipe("trl-grpo").grpo
    return get_recipe("tiny").with_values({
        "run.name": name, "run.out_dir": str(out_dir), "run.data": str(data), "run.seed": s.seed,
        "run.steps": s.steps, "run.eval_every": 0, "run.save_every": 0, "run.tensorboard": False,
        "batch.prompts_per_step": s.prompts, "grpo.group_size": s.group, "rollout.max_new_tokens": s.max_new_tokens,
        # TRL's loss_type="grpo" (the trl-grpo recipe), with the tiny recipe's KL to the base
        "grpo.agg": trl_loss.agg, "grpo.adv_eps": trl_loss.adv_eps, "grpo.adv_scale": trl_loss.adv_scale,
        "grpo.tis": trl_loss.tis, "grpo.tis_cap": trl_loss.tis_cap, "grpo.eps_low": trl_loss.eps_low,
        "grpo.eps_high": trl_loss.eps_high, "grpo.dual_clip": trl_loss.dual_clip,
        "grpo.kl_estimator": "k3", "grpo.kl_clamp": None, "grpo.old_logp": s.old_logp,
    })


def trl_config_kwargs(cfg: Config, *, output_dir: str | Path) -> dict[str, Any]:
    """``trl.GRPOConfig`` keywords that run `cfg`'s job (TRL 1.16 field names, read from its
    ``grpo_config.py`` and transformers' ``TrainingArguments``)."""
    if cfg.batch.minibatches_per_step != 1:
        raise ValueError("batch.minibatches_per_step must be 1: the TRL mapping makes one optimizer step per rollout")
    if cfg.grpo.agg != TRL_LOSS_AGG[TRL_LOSS_TYPE] or cfg.grpo.tis or cfg.grpo.dual_clip is not None or \
            cfg.grpo.kl_estimator != "k3" or cfg.grpo.kl_clamp is not None or cfg.grpo.ratio_level != "token":
        raise ValueError(f"grpo: {cfg.grpo} is not TRL's loss_type={TRL_LOSS_TYPE!r}")
    o, g, r = cfg.optim, cfg.grpo, cfg.rollout
    rows = cfg.batch.prompts_per_step * g.group_size
    return {
        "output_dir": str(output_dir), "seed": cfg.run.seed, "max_steps": cfg.run.steps,
        # one rollout of P prompts x G, one optimizer step on all of it (r1mega: minibatches_per_step 1)
        "per_device_train_batch_size": rows, "gradient_accumulation_steps": 1, "steps_per_generation": 1,
        "num_generations": g.group_size, "num_iterations": 1, "shuffle_dataset": False,
        "max_completion_length": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
        "top_k": r.top_k, "min_p": None, "repetition_penalty": 1.0,
        "loss_type": TRL_LOSS_TYPE, "beta": g.kl_coef, "epsilon": g.eps_low, "epsilon_high": g.eps_high,
        "scale_rewards": g.adv_scale, "mask_truncated_completions": g.overlong == "mask",
        "router_aux_loss_coef": 0.0, "disable_dropout": True,
        "learning_rate": o.lr, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": o.warmup_steps,
        "adam_beta1": o.adam_beta1, "adam_beta2": o.adam_beta2, "adam_epsilon": o.adam_eps,
        "weight_decay": o.weight_decay, "max_grad_norm": o.grad_clip or 0.0,
        # CPU, fp32 like r1mega's policy, nothing r1mega does not do either
        "use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False, "use_vllm": False,
        "model_init_kwargs": {"dtype": "float32"}, "report_to": "none", "save_strategy": "no",
        "logging_steps": 1, "log_completions": False, "dataloader_num_workers": 0, "remove_unused_columns": False,
    }


def r1mega_hyperparameters(cfg: Config) -> dict[str, Any]:
    """The hyper-parameters both sides must share, as r1mega's config states them."""
    o, g, r = cfg.optim, cfg.grpo, cfg.rollout
    return {
        "steps": cfg.run.steps, "seed": cfg.run.seed, "prompts_per_step": cfg.batch.prompts_per_step,
        "group_size": g.group_size, "optimizer_steps_per_rollout": cfg.batch.minibatches_per_step,
        "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
        "lr": o.lr, "warmup_steps": o.warmup_steps, "lr_after_warmup": "constant", "adam_beta1": o.adam_beta1,
        "adam_beta2": o.adam_beta2, "adam_eps": o.adam_eps, "weight_decay": o.weight_decay, "grad_clip": o.grad_clip,
        "kl_coef": g.kl_coef, "kl_estimator": g.kl_estimator, "clip_low": g.eps_low, "clip_high": g.eps_high,
        "adv_scale": g.adv_scale, "adv_eps": g.adv_eps, "loss_agg": g.agg,
        "importance_sampling_vs_rollout": g.tis, "truncated_masked": g.overlong == "mask", "router_aux_loss": 0.0,
    }


def trl_hyperparameters(args: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The same hyper-parameters as TRL reads them from a ``GRPOConfig`` (or its keywords), with
    TRL's fixed choices: k3 KL, eps 1e-4 in the std, no importance sampling without vLLM."""
    get = args.get if isinstance(args, Mapping) else lambda k: getattr(args, k)
    rows = get("per_device_train_batch_size") * get("gradient_accumulation_steps")
    generation_rows = rows * get("steps_per_generation")
    schedule = get("lr_scheduler_type")
    return {
        "steps": get("max_steps"), "seed": get("seed"), "prompts_per_step": generation_rows // get("num_generations"),
        "group_size": get("num_generations"),
        "optimizer_steps_per_rollout": get("steps_per_generation") * get("num_iterations")
        // get("gradient_accumulation_steps"),
        "max_new_tokens": get("max_completion_length"), "temperature": get("temperature"), "top_p": get("top_p"),
        "top_k": get("top_k"), "lr": get("learning_rate"), "warmup_steps": get("warmup_steps"),
        "lr_after_warmup": "constant" if str(getattr(schedule, "value", schedule)) == "constant_with_warmup" else schedule,
        "adam_beta1": get("adam_beta1"), "adam_beta2": get("adam_beta2"), "adam_eps": get("adam_epsilon"),
        "weight_decay": get("weight_decay"), "grad_clip": get("max_grad_norm") or None, "kl_coef": get("beta"),
        "kl_estimator": "k3", "clip_low": get("epsilon"), "clip_high": get("epsilon_high"),
        "adv_scale": get("scale_rewards"), "adv_eps": 1e-4, "loss_agg": TRL_LOSS_AGG[get("loss_type")],
        "importance_sampling_vs_rollout": bool(get("use_vllm")), "truncated_masked": get("mask_truncated_completions"),
        "router_aux_loss": get("router_aux_loss_coef"),
    }


def step_prompts(records: Sequence[PromptRecord], cfg: Config) -> list[list[PromptRecord]]:
    """The prompts of each of `cfg`'s steps, as ``r1mega train``'s sampler hands them out."""
    from r1mega.data import PromptSampler

    sampler = PromptSampler(list(records), batch_size=cfg.batch.prompts_per_step, seed=cfg.run.seed)
    return [list(next(sampler)) for _ in range(cfg.run.steps)]


def trl_rows(records: Sequence[PromptRecord], template: str = "r1_zero") -> list[dict[str, str]]:
    """Dataset rows for TRL: the prompt text r1mega's template renders (TRL tokenizes it as is)
    and the record's id, which the reward functions look up."""
    from r1mega.templates import r1_zero_prompt

    if template != "r1_zero":
        raise ValueError(f"run.template: {template!r}: the TRL comparison renders the R1-Zero template only")
    return [{"prompt": r1_zero_prompt(r.prompt), "record_id": r.id} for r in records]


def trl_reward_functions(cfg: Config, records: Sequence[PromptRecord]) -> tuple[list[Callable], list[float]]:
    """TRL reward functions (and their weights) that score with r1mega's registered rewards, with
    the options and weights r1mega's reward pool gets from `cfg`: a skipped reward is None (TRL's
    "not applicable", NaN in its nansum), as it adds nothing to r1mega's weighted total."""
    from r1mega.rewards import get_reward, pool_kwargs

    by_id = {r.id: r for r in records}
    pool = pool_kwargs(cfg.rewards)
    options = pool["options"] or {}
    funcs, weights = [], []
    for name, weight in pool["weights"].items():
        fn = get_reward(name, pool["rewards"])

        def reward(prompts, completions, record_id, _fn=fn, _options=options.get(name, {}), **_):
            values = []
            for rid, completion in zip(record_id, completions, strict=True):
                out = _fn(by_id[rid], completion, **_options)
                values.append(None if out.skipped else out.value)
            return values

        reward.__name__ = name  # TRL logs rewards/<name>
        funcs.append(reward)
        weights.append(weight)
    return funcs, weights


def spec_file(path: str | Path, *, settings: Settings, cfg: Config, base_model: str | Path, data: str | Path,
              out_dir: str | Path) -> Path:
    """The JSON the TRL driver reads: everything it needs, r1mega's config included."""
    path = Path(path)
    from r1mega.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps({"settings": settings.to_dict(), "config": cfg.to_dict(),
                                        "base_model": str(base_model), "data": str(data),
                                        "out_dir": str(out_dir)}, indent=2) + "\n")
    return path
