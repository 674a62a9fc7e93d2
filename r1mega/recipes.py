"""Named recipes: functions returning a complete, validated :class:`~r1mega.config.Config`.

A recipe states only what differs from the defaults, so it reads as the paper or the system it
reproduces. The first docstring line is what ``r1mega recipes`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from r1mega.config import Config, ConfigError, did_you_mean

RECIPES: dict[str, Callable[[], Config]] = {}


def recipe(fn: Callable[[], Config] | None = None, *, name: str | None = None):
    """Register a recipe under its function's name with '-' for '_' (or `name`: r1-zero-qwen2.5-7b)."""
    def register(f: Callable[[], Config]) -> Callable[[], Config]:
        RECIPES[name or f.__name__.replace("_", "-")] = f
        return f
    return register(fn) if fn is not None else register


def get_recipe(name: str) -> Config:
    """Build the recipe called `name`; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, list(RECIPES))} "
                          f"(known: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]()


def summary(name: str) -> str:
    return (RECIPES[name].__doc__ or "").strip().splitlines()[0]


@recipe
def r1_zero() -> Config:
    """DeepSeek-R1-Zero's GRPO settings as the paper reports them (Nature 2025, methods)."""
    # 16 samples per question; 8,192 rollouts (512 questions) split into 16 mini-batches of
    # 32 questions, one inner epoch; lr 3e-6; KL coefficient 0.001 with the k3 estimator;
    # clip ratio 10; temperature 1; 32k-token completions; reference replaced every 400 steps.
    # The objective averages 1/|o_i| within a sequence and 1/G across them: seq-mean-token-mean.
    return Config().with_values({
        "run.name": "r1-zero",
        "grpo.group_size": 16, "grpo.eps_low": 10.0, "grpo.eps_high": 10.0,
        "grpo.kl_coef": 0.001, "grpo.kl_estimator": "k3", "grpo.agg": "seq-mean-token-mean",
        "grpo.tis": False, "grpo.tis_cap": None, "grpo.ref_update_interval": 400,
        "batch.prompts_per_step": 512, "batch.minibatches_per_step": 16,
        "rollout.temperature": 1.0, "rollout.max_new_tokens": 32768, "optim.lr": 3e-6,
    })


@recipe
def tiny() -> Config:
    """The embedded default on 2 CPU cores: R1-Zero GRPO of the tiny MoE base on two-digit addition.

    G = 8 completions of 8 prompts per step, one optimizer step each, the R1 loss (k3 KL 0.001 to
    the base, seq-mean-token-mean), completions of at most 48 tokens, pass@1 of 200 held-out
    problems (4 samples at T 0.6, top-p 0.95) before, every 20 steps and after.
    """
    return Config().with_values({
        "run.name": "tiny", "run.steps": 60, "eval.every": 20, "run.save_every": 20,
        "eval.samples": 4, "eval.max_prompts": 200,
        "grpo.group_size": 8, "grpo.agg": "seq-mean-token-mean", "grpo.kl_coef": 0.001,
        "batch.prompts_per_step": 8, "batch.micro_batch_tokens": 4096,
        "rollout.max_new_tokens": 48, "rollout.max_prompt_tokens": 128, "rollout.refit_bucket_mb": 64,
        "optim.lr": 5e-5, "optim.weight_decay": 0.0, "optim.warmup_steps": 5,
    })


@recipe
def tiny_cold_start() -> Config:
    """R1 stage 1 on the embedded default: SFT of the tiny base on the cold-start set.

    2000 R1-format examples (English and Chinese additions, half of the chains of thought ending in
    the other language), 2 epochs of 8 packed rows x 512 tokens per step, lr 1e-3 after a 5-step
    warm-up. Many examples seen twice, not a few seen often: with 600 examples for 6 epochs (as
    many steps) the model learned the training answers rather than how the base composes them from
    the column sums, and held-out pass@1 depended on the base (0.698 on one base pretrained with
    one thread, 0.372 on another); with 2000 for 2 epochs 0.642 and 0.635. The prompt stays the
    R1-Zero template, the only one the tiny base model can read (a chat template it has never seen
    costs it the digits: measured pass@1 0.000 after the same SFT); the output format changes to
    R1's (think block, then a summary with the boxed answer).
    """
    return Config().with_values({
        "run.name": "tiny-cold-start", "run.save_every": 50,
        "sft.epochs": 2, "sft.rows_per_step": 8, "sft.row_tokens": 512,
        "batch.micro_batch_tokens": 2048,
        "optim.lr": 1e-3, "optim.weight_decay": 0.0, "optim.warmup_steps": 5,
    })


@recipe
def tiny_reasoning_rl() -> Config:
    """R1 stage 2 on the embedded default: GRPO from the cold start with accuracy + format + language consistency.

    The tiny recipe's GRPO (G = 8 of 8 prompts, one optimizer step, lr 5e-5) for 40 steps on the
    English and Chinese additions, scored by accuracy, the R1 summary format and the
    language-consistency reward summed with weight 1 as the paper does; completions of at most
    80 tokens; pass@1 of 100 held-out problems before and after.
    """
    return tiny().with_values({
        "run.name": "tiny-reasoning-rl", "run.steps": 40, "eval.every": 0, "eval.max_prompts": 100,
        "rewards.format_style": "summary", "rewards.language_weight": 1.0, "rollout.max_new_tokens": 80,
    })


@recipe
def tiny_rejection_sft() -> Config:
    """R1 stage 3 on the embedded default: SFT of the *base* model on rejection-sampled reasoning + general data.

    The cold start's SFT settings (6 epochs of packed rows of 512 tokens, 8 per step, lr 1e-3 after
    5 warm-up steps; measured: 4 epochs left held-out pass@1 at 0.45, 6 reach 0.60); the data
    (sft.data) is what ``r1mega sample`` kept from stage 2 plus the embedded general prompts' answers.
    """
    return tiny_cold_start().with_values({"run.name": "tiny-rejection-sft", "sft.epochs": 6})


@recipe
def tiny_all_scenario_rl() -> Config:
    """R1 stage 4 on the embedded default: GRPO over reasoning and general prompts, each routed to its reward.

    Stage 2's settings for 60 steps on a mix of additions (rule rewards) and general prompts
    (rewards.reward_model, trained by ``r1mega rm``), language consistency on both, with DAPO's
    dynamic sampling. Two thirds of the mix are additions, so 60 steps give the additions about
    stage 2's 40 steps of updates; stage 3 already solves most of them, so most groups score alike
    and carry no advantage, and dynamic sampling refills the batch with groups that do. Measured on
    the base whose stage 2 solved all 400 held-out samples: 30 steps 0.973, 60 steps 0.980, 60 steps
    with dynamic sampling 0.993.
    """
    return tiny_reasoning_rl().with_values({"run.name": "tiny-all-scenario-rl", "run.steps": 60,
                                            "grpo.dynamic_sampling": True})


@recipe
def tiny_reasoning_rl_no_language() -> Config:
    """R1 stage 2's ablation on the embedded default: tiny-reasoning-rl without the language-consistency reward.

    What the language reward does to language mixing is the difference between this run and stage 2's.
    """
    return tiny_reasoning_rl().with_values({"run.name": "tiny-reasoning-rl-no-language",
                                            "rewards.language_weight": 0.0})


@recipe
def tiny_rejection_sampling() -> Config:
    """R1 stage 3's data on the embedded default: ``r1mega sample`` of the stage-2 model, one verified trace per prompt.

    4 samples per prompt at T 0.7, top-p 0.95, completions of at most 80 tokens (stage 2's budget),
    kept when correct and readable in R1's summary format, at most one per prompt.
    """
    return Config().with_values({
        "run.name": "tiny-rejection-sampling", "sample.samples": 4, "sample.max_per_prompt": 1,
        "sample.max_new_tokens": 80, "rewards.format_style": "summary",
    })


@recipe
def tiny_reward_model() -> Config:
    """R1 stage 4's scorer on the embedded default: ``r1mega rm`` on the general prompts' preference pairs.

    Bradley-Terry from the tiny base model: 4 epochs of 8 pairs per step at lr 5e-4 (the rm section's defaults).
    """
    return Config().with_values({"run.name": "tiny-reward-model"})


@recipe
def tiny_distill() -> Config:
    """R1's distillation on the embedded default: ``r1mega distill`` of the dense student (SFT as tiny-rejection-sft).

    4 teacher samples per prompt at T 0.7 (96 tokens), at most 2 traces kept per prompt, in R1's summary
    format; the student's SFT is stage 3's (6 epochs); evaluation by R1's protocol within 96 tokens.
    """
    return tiny_rejection_sft().with_values({"run.name": "tiny-distill"})


@recipe
def tiny_r1_eval() -> Config:
    """R1's evaluation protocol on the embedded default's R1 stages: 4 samples at T 0.6, top-p 0.95 + greedy, 96 tokens.

    The R1 output format (think block, then a summary with the boxed answer), so format and accuracy
    are read as the R1 stages write; ``r1mega pipeline`` evaluates every model with it.
    """
    return Config().with_values({"run.name": "tiny-r1-eval", "eval.max_new_tokens": 96,
                                 "rewards.format_style": "summary"})


@recipe
def r1() -> Config:
    """The whole DeepSeek-R1 recipe on the embedded default (``r1mega pipeline``): each stage runs its own tiny-* recipe.

    The pipeline section: where it writes, 100 held-out problems, 1200 prompts rejection-sampled, 600
    additions mixed with the general prompts in stage 4 (r1mega.pipeline.STAGE_RECIPES names the stages' recipes).
    """
    return Config().with_values({"run.name": "r1-pipeline"})


@recipe
def verl_grpo() -> Config:
    """verl's GRPO defaults: token-mean, dual clip 3, KL loss low_var_kl clamped at 10."""
    return Config().with_values({
        "run.name": "verl-grpo",
        "grpo.adv_eps": 1e-6, "grpo.eps_low": 0.2, "grpo.eps_high": 0.2, "grpo.dual_clip": 3.0,
        "grpo.kl_coef": 0.001, "grpo.kl_estimator": "k3", "grpo.kl_clamp": 10.0,
        "grpo.agg": "token-mean", "grpo.tis": False, "grpo.tis_cap": None,
    })


@recipe
def trl_grpo() -> Config:
    """TRL's loss_type='grpo': per-sequence token means, eps 1e-4 in the std, no KL by default."""
    return Config().with_values({
        "run.name": "trl-grpo",
        "grpo.adv_eps": 1e-4, "grpo.kl_coef": 0.0, "grpo.agg": "seq-mean-token-mean",
        "grpo.tis": False, "grpo.tis_cap": None,
    })


@recipe
def dr_grpo() -> Config:
    """Dr. GRPO: no std normalisation, sums over tokens divided by a constant length."""
    return Config().with_values({
        "run.name": "dr-grpo",
        "grpo.adv_scale": "none", "grpo.kl_coef": 0.0, "grpo.agg": "seq-mean-token-sum-norm",
    })


@recipe
def dapo() -> Config:
    """DAPO's loss: clip-higher (0.2, 0.28), token-mean over the whole batch, no KL."""
    return Config().with_values({
        "run.name": "dapo",
        "grpo.eps_low": 0.2, "grpo.eps_high": 0.28, "grpo.kl_coef": 0.0, "grpo.agg": "token-mean",
    })


@recipe
def gspo() -> Config:
    """GSPO: sequence-level importance ratio with the paper's tight clip range (3e-4, 4e-4)."""
    return Config().with_values({
        "run.name": "gspo",
        "grpo.ratio_level": "sequence", "grpo.eps_low": 3e-4, "grpo.eps_high": 4e-4,
        "grpo.kl_coef": 0.0, "grpo.agg": "seq-mean-token-mean",
    })


# ---- GPU recipes for real models (R1-Zero on a published base) ----------------------------------
# Each setting is a published R1-Zero-style reproduction's, cited where it is set. Validated on CPU
# by `--dry-run` and `r1mega plan` (tests/test_recipes_gpu.py, with the bases' published config.json).


@recipe(name="r1-zero-qwen2.5-7b")
def r1_zero_qwen2_5_7b() -> Config:
    """R1-Zero on a dense Qwen2.5 base (1.5B-7B) on GPUs, with DAPO's GRPO settings: one node of 8 H100 and up.

    Sources (DAPO: volcengine/verl@246cac4 recipe/dapo/test_dapo_7b_math.sh, its Qwen2.5-Math-7B script,
    and run_dapo_qwen2.5_32b.sh; DAPO paper §4.1):
    - optim.lr 1e-6, 10 warm-up steps, weight decay 0.1, gradient clip 1.0 (L88-90; the paper warms up
      over 20 steps; SimpleRL-Zoo, Dr. GRPO and Open-Reasoner-Zero train 7B bases at 1e-6 or 5e-7 too);
    - grpo.group_size 16, batch.prompts_per_step 512, batch.minibatches_per_step 16: n_resp_per_prompt=16,
      train_prompt_bsz=512, train_prompt_mini_bsz=32 (L25-27; the paper: "16 gradient updates for
      each rollout step");
    - grpo.eps_low 0.2, grpo.eps_high 0.28 (clip-higher, L14-15), grpo.dual_clip 10 (clip_ratio_c=10.0);
    - no KL penalty and no reference model (grpo.kl_coef 0): use_kl_in_reward=False, use_kl_loss=False
      (L9-12; the paper §2.3 drops it);
    - grpo.agg token-mean: loss_agg_mode="token-mean" (L23);
    - rollout.max_prompt_tokens 2048, rollout.max_new_tokens 8192 with grpo.overlong soft over the last
      4096 tokens (overlong_buffer_len=4096, overlong_penalty_factor=1.0, L17-21);
    - rollout.temperature 1.0, top_p 1.0 (L44-47); run.steps 200 (total_training_steps=200, L128);
    - grpo.dynamic_sampling with up to 9 extra rounds: enable_filter_groups=True, max_num_gen_batches=10
      (run_dapo_qwen2.5_32b.sh L25-27; the 7B test_dapo_7b.sh keeps it on).
    Qwen2.5-Math-7B has 4096 positions: DAPO raises max_position_embeddings to 32768 in its config.json
    (L37); without that, the prompt check refuses 2048 + 8192 in one line before any model is built.
    Layout: tensor parallel 2 for the policy and the colocated vLLM engine (one node of 8: 4 data-parallel
    replicas). The template is R1-Zero's, for a base model; an instruct model (Qwen2.5-7B-Instruct)
    takes --set run.template=chat (its tokenizer's chat template).
    """
    return Config().with_values({
        "run.name": "r1-zero-qwen2.5-7b", "run.steps": 200, "run.save_every": 20, "eval.every": 20,
        "optim.lr": 1e-6, "optim.warmup_steps": 10, "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
        "grpo.group_size": 16, "batch.prompts_per_step": 512, "batch.minibatches_per_step": 16,
        "grpo.eps_low": 0.2, "grpo.eps_high": 0.28, "grpo.dual_clip": 10.0, "grpo.kl_coef": 0.0,
        "grpo.agg": "token-mean", "grpo.dynamic_sampling": True, "grpo.max_resample_rounds": 9,
        "grpo.overlong": "soft", "grpo.overlong_buffer": 4096,
        "rollout.engine": "vllm", "rollout.tp": 2, "rollout.max_prompt_tokens": 2048, "rollout.max_new_tokens": 8192,
        "rollout.temperature": 1.0, "rollout.top_p": 1.0,
        "parallel.tp": 2, "batch.micro_batch_tokens": 16384,
    })


@recipe(name="r1-zero-qwen3-30b-a3b")
def r1_zero_qwen3_30b_a3b() -> Config:
    """R1-Zero on a Qwen3-MoE base (Qwen3-30B-A3B-Base) on GPUs: verl's Megatron GRPO settings, 1-4 nodes of 8.

    Sources (volcengine/verl@b178a3cd examples/grpo_trainer/run_qwen3moe-30b_megatron_96gb.sh, "tested in
    NNODES=1~4 * 96G H20 GPU", on Qwen/Qwen3-30B-A3B-Base; THUDM/slime@624b824a scripts/run-qwen3-30B-A3B.sh
    agrees on lr, clip and layout):
    - optim.lr 1e-6, 10 warm-up steps, constant, weight decay 0.1 (L119-122; slime: --lr 1e-6 --weight-decay 0.1);
    - grpo.group_size 16, batch.prompts_per_step 512, batch.minibatches_per_step 4: n_resp_per_prompt=16,
      train_prompt_bsz=512, train_prompt_mini_bsz=128 (L27-29);
    - grpo.eps_low 0.2, grpo.eps_high 0.28 (L12-18; slime --eps-clip 0.2 --eps-clip-high 0.28);
    - no KL penalty (kl 0 in both scripts; slime --kl-loss-coef 0.00), grpo.agg token-mean;
    - rollout.max_prompt_tokens 2048, rollout.max_new_tokens 8192 with the soft overlong penalty over the
      last 4096 tokens (L19-23: max response 1024 * 8, overlong buffer 1024 * 4, penalty 1.0);
    - layout: expert parallel 8, tensor parallel 1, pipeline 1 (COMMON_EP 8, COMMON_TP 1; slime: EP 8),
      the vLLM engine at tensor parallel 4 (INFER_TP 4).
    The 96 GB H20s of the source hold a 30B model's optimizer state in 8 ranks; on 80 GB H100s use two
    nodes or more (r1mega plan shows each rank's experts and layers).
    """
    return Config().with_values({
        "run.name": "r1-zero-qwen3-30b-a3b", "run.steps": 200, "run.save_every": 20, "eval.every": 20,
        "optim.lr": 1e-6, "optim.warmup_steps": 10, "optim.weight_decay": 0.1, "optim.grad_clip": 1.0,
        "grpo.group_size": 16, "batch.prompts_per_step": 512, "batch.minibatches_per_step": 4,
        "grpo.eps_low": 0.2, "grpo.eps_high": 0.28, "grpo.kl_coef": 0.0, "grpo.agg": "token-mean",
        "grpo.overlong": "soft", "grpo.overlong_buffer": 4096,
        "rollout.engine": "vllm", "rollout.tp": 4, "rollout.max_prompt_tokens": 2048, "rollout.max_new_tokens": 8192,
        "rollout.temperature": 1.0, "rollout.top_p": 1.0,
        "parallel.ep": 8, "batch.micro_batch_tokens": 16384,
    })


# ---- evaluation presets: r1mega eval --benchmark NAME ------------------------------------------
# Evaluation presets by DeepSeek-R1's protocol (``r1mega eval --benchmark NAME --data FILE``).
#
# The paper (DeepSeek-R1, §3 "Evaluation setup"; Nature 2025, methods) evaluates with sampling
# temperature 0.6 and top-p 0.95, "k responses (typically between 4 and 64, depending on the test
# set size)" per question, reports pass@1 as their mean correctness and cons@64 (majority vote) on
# AIME, and allows up to 32,768 generated tokens. A preset sets, for the user's local copy of the
# benchmark in its published format:
#
# * ``data.format``: how the file is read (r1mega.data.formats);
# * ``eval.samples``: k by test-set size (AIME: 30 problems, 64 samples; AMC 2023: 40, 32;
#   MATH-500, GSM8K, HumanEval: hundreds of problems, 4);
# * ``eval.temperature`` 0.6, ``eval.top_p`` 0.95, ``eval.max_new_tokens`` 32768;
# * the breakdowns reported beside the means (MATH-500: per subject and per level).
#
# The preset is applied before ``--set`` and the command's flags, so either overrides it. On a model
# with fewer positions than the budget (the embedded one: 1024), the prompt check refuses the
# settings in one line before any model is built (``eval.max_new_tokens ... leaves no room``).

R1_MAX_NEW_TOKENS = 32768


@dataclass(frozen=True)
class Benchmark:
    """One evaluation preset: the file's format, k, and the record fields reported by group."""

    format: str
    samples: int
    breakdown: tuple[str, ...] = ()

    def config_values(self) -> dict[str, Any]:
        """The {key: value} the preset sets (under --set and the flags)."""
        return {"data.format": self.format, "eval.samples": self.samples, "eval.temperature": 0.6,
                "eval.top_p": 0.95, "eval.max_new_tokens": R1_MAX_NEW_TOKENS}


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("math", 4, ("subject", "level")),
    "aime24": Benchmark("aime", 64),
    "aime25": Benchmark("aime", 64),
    "amc23": Benchmark("amc", 32),
    "gsm8k": Benchmark("gsm8k", 4),
    "humaneval": Benchmark("humaneval", 4),
}
