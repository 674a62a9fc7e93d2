"""The registry of rewards by name: what a run's reward weights (r1mega.config's rewards section)
and :class:`~r1mega.rewards.composite.CompositeReward` / :class:`~r1mega.rewards.pool.RewardPool`
look up. It sits above the rule modules (accuracy, countdown, code, format, language), which
import only r1mega.rewards.base.

Built in:

* "accuracy": correctness by ``record.task`` (math, countdown, code; "general" is an error: the
  reward model scores those);
* "format": R1-Zero tags, ``<think>..</think> <answer>..</answer>``;
* "format_summary": R1 format, ``<think>..</think>`` then a summary (math: with the boxed answer);
* "language": language consistency of the chain of thought with ``record.language`` (skipped
  when it is None).

Further rewards can be registered with :func:`register_reward`, or named ``"module:function"``
(:func:`load_reward`). The registered functions must be module-level (picklable by reference):
RewardPool sends them to its worker processes, which import the defining module.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Mapping

from r1mega.data.records import PromptRecord
from r1mega.rewards.accuracy import last_boxed, math_accuracy_detailed
from r1mega.rewards.base import RewardFn, RewardOutput, check_completion, check_record
from r1mega.rewards.code import code_reward
from r1mega.rewards.countdown import countdown_reward_detailed
from r1mega.rewards.format import format_reward_detailed
from r1mega.rewards.language import language_consistency_detailed

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
    """Register ``fn`` under ``name``; usable as ``@register_reward("name")``.

    Raises ValueError if ``name`` is taken (unless ``overwrite``) or is not a non-empty str.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise ValueError(f"fn must be callable, got {type(f).__name__}")
        if name in REWARDS and REWARDS[name] is not f and not overwrite:
            raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
        REWARDS[name] = f
        return f

    return add if fn is None else add(fn)


def get_reward(name: str, extra: Mapping[str, RewardFn] | None = None) -> RewardFn:
    """The reward registered as ``name`` (``extra`` is searched first); ValueError naming it."""
    if extra and name in extra:
        return extra[name]
    if name in REWARDS:
        return REWARDS[name]
    known = sorted(set(REWARDS) | set(extra or ()))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown reward {name!r}{hint} (known: {', '.join(known)})")


def load_reward(spec: str) -> RewardFn:
    """A user's reward named ``"package.module:function"``, imported here (and by name in the
    reward workers). ValueError, one line naming `spec`, when it cannot be imported or called."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (any import-time failure is the user's to see)
        raise ValueError(f"{spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def check_weights(weights: Mapping[str, float], extra: Mapping[str, RewardFn] | None = None
                  ) -> dict[str, float]:
    """``weights`` as a plain {name: float} dict, every name resolvable by :func:`get_reward`.

    Raises ValueError for an empty mapping, an unknown name or a non-finite weight. A weight of
    0 is allowed: the reward is computed and reported in the metrics but adds nothing to the
    total (e.g. to watch language consistency without training on it).
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must be a non-empty mapping {{reward name: weight}}, got {weights!r}")
    out: dict[str, float] = {}
    for name, weight in weights.items():
        get_reward(name, extra)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights[{name!r}] must be a finite number, got {weight!r}")
        out[name] = float(weight)
    return out


# ---- built-in rewards -------------------------------------------------------------------------


@register_reward("accuracy")
def accuracy_reward(record: PromptRecord, completion: str, *, math_timeout_s: float = 5.0,
                    code_timeout_s: float = 5.0, code_memory_mb: int = 512,
                    countdown_use_all: bool = True, skip_general: bool = False) -> RewardOutput:
    """Correctness by the rule of ``record.task``:

    "math": :func:`~r1mega.rewards.accuracy.math_accuracy` against ``record.answer``
        (``math_timeout_s``); a gold answer that cannot be parsed raises GoldAnswerError.
    "countdown": :func:`~r1mega.rewards.countdown.countdown_reward` (``countdown_use_all``).
    "code": ``r1mega.rewards.code.code_reward(completion, record.tests, timeout_s=code_timeout_s,
        memory_mb=code_memory_mb)``, the fraction of tests passed.
    "general": ValueError: there is no rule; general prompts are scored by
        :class:`~r1mega.rewards.reward_model.RewardModel`. With ``skip_general`` (set when a
        reward model scores them, :class:`~r1mega.rewards.routing.RoutedRewards`) the reward is
        skipped instead.
    """
    check_record(record)
    check_completion(completion)
    if record.task == "math":
        out = math_accuracy_detailed(completion, record.answer, timeout_s=math_timeout_s)
    elif record.task == "countdown":
        out = countdown_reward_detailed(completion, record, use_all=countdown_use_all)
    elif record.task == "code":
        out = RewardOutput(code_reward(completion, record.tests, timeout_s=code_timeout_s,
                                       memory_mb=code_memory_mb))
    elif record.task == "general":
        if skip_general:
            return RewardOutput.skip("task 'general' is scored by the reward model")
        raise ValueError(f"record {record.id!r}: the accuracy reward has no rule for task "
                         "'general'; score general prompts with r1mega.rewards.RewardModel")
    else:
        raise ValueError(f"record {record.id!r}: unknown task {record.task!r}")
    return RewardOutput(out.value, {"task": record.task, **out.info})


@register_reward("format")
def format_tags_reward(record: PromptRecord, completion: str, *, think_prefilled: bool = False
                       ) -> RewardOutput:
    """R1-Zero format: one ``<think>`` block then one ``<answer>`` block, nothing else."""
    return format_reward_detailed(completion, think_prefilled=think_prefilled)


@register_reward("format_summary")
def format_summary_reward(record: PromptRecord, completion: str, *, think_prefilled: bool = False
                          ) -> RewardOutput:
    """R1 format: one ``<think>`` block then a non-blank summary; for a math record the summary
    gives the final answer in ``\\boxed{}`` (R1 asks for math answers "in a specified format
    (e.g., within a box)", which is what r1mega.templates.render_r1_completion writes). An
    R1-Zero ``<answer>`` block instead of a boxed answer is therefore not the R1 format."""
    out = format_reward_detailed(completion, answer=None, think_prefilled=think_prefilled)
    if out.value and record.task == "math":
        summary = completion[completion.rfind("</think>") + len("</think>"):]
        if last_boxed(summary) is None:
            return RewardOutput(0.0, {"reason": "no \\boxed{} answer in the summary"})
    return out


@register_reward("language")
def language_reward(record: PromptRecord, completion: str) -> RewardOutput:
    """Language consistency of the chain of thought with ``record.language``.

    Skipped (adds nothing, left out of the mean) when ``record.language`` is None: a record that
    does not name a language has no target to be consistent with, and a constant stand-in value
    would only shift the logged mean (GRPO advantages ignore a per-prompt constant anyway).
    """
    check_record(record)
    if record.language is None:
        return RewardOutput.skip("record.language is None")
    return language_consistency_detailed(completion, record.language)
