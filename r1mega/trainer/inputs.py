"""The GRPO run's inputs, resolved and checked before any work: the policy's source, the train
and held-out prompts, the reward settings, the budgets that must fit each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r1mega.config import Config
from r1mega.data import DataError, base_corpus, load_prompts
from r1mega.evaluation.prompt_fit import fit_to_model
from r1mega.rewards import GoldAnswerError, parse_gold, pool_kwargs
from r1mega.rewards import sandbox  # through the module: the tests replace its require_backend
from r1mega.run.rundir import resolve_model


class TrainError(ValueError):
    """A problem with the run's inputs, found before any work; the message is one line."""


@dataclass
class Inputs:
    """What a GRPO run reads, resolved and checked."""

    model_dir: Path  # the policy's source (HF dir or checkpoint)
    hf_dir: Path  # its config and tokenizer
    train: list
    heldout: list
    embedded: bool
    reward_pool_kwargs: dict  # RewardPool's keywords (rewards.custom imported)


def resolve_inputs(cfg: Config) -> Inputs:
    """The run's model, prompts and reward settings, each checked before any work (TrainError,
    one line naming the file, row, field or key)."""
    run = cfg.run
    if run.model is not None and not Path(run.model).is_dir():
        raise TrainError(f"run.model: {run.model!r} is not a directory (a Hugging Face model or an r1mega checkpoint)")
    try:
        train = (load_prompts(run.data, **cfg.data.loader_kwargs()) if run.data is not None
                 else base_corpus.problems("train", seed=run.seed))
        if run.heldout is not None:
            heldout = load_prompts(run.heldout, **cfg.data.loader_kwargs())
        else:
            heldout = base_corpus.problems("test", seed=run.seed) if run.data is None else []
    except DataError as err:
        raise TrainError(str(err)) from None
    for name, records in (("run.data", train), ("run.heldout", heldout)):
        for record in records:
            if record.task == "general" and cfg.rewards.reward_model is None:
                raise TrainError(f"{getattr(run, name.split('.')[1]) or 'the embedded task'}: id {record.id!r}: "
                                 "task 'general' has no rule reward; set rewards.reward_model to a reward model "
                                 "directory (r1mega rm)")
            if record.task == "math":
                try:
                    parse_gold(record.answer)
                except GoldAnswerError as err:
                    raise TrainError(f"{getattr(run, name.split('.')[1]) or 'the embedded task'}: id {record.id!r}: "
                                     f"field 'answer': {err}") from None
    if "accuracy" in cfg.rewards.weights() and any(r.task == "code" for r in (*train, *heldout)):
        try:
            sandbox.require_backend()
        except sandbox.SandboxUnavailable as err:
            raise TrainError(f"{run.data or 'run.data'}: task 'code' records are scored in a sandbox, but {err}") \
                from None
    if cfg.rewards.reward_model is not None and not Path(cfg.rewards.reward_model).is_dir():
        raise TrainError(f"rewards.reward_model: {cfg.rewards.reward_model!r} is not a directory (a Hugging Face "
                         "sequence-classification model, e.g. from r1mega rm)")
    try:
        reward_kwargs = pool_kwargs(cfg.rewards)
    except ValueError as err:
        raise TrainError(str(err)) from None
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    if cfg.batch.micro_batch_tokens < longest:
        raise TrainError(f"batch.micro_batch_tokens {cfg.batch.micro_batch_tokens} < rollout.max_prompt_tokens + "
                         f"rollout.max_new_tokens = {longest}: a sequence would not fit one micro-batch")
    model_dir, hf_dir = resolve_model(run.model)
    heldout = heldout[:cfg.eval.max_prompts]
    try:
        train, heldout = fit_to_model(
            hf_dir, (run.data or "the embedded task", train, "rollout.max_new_tokens", cfg.rollout.max_new_tokens),
            (run.heldout or "the embedded held-out split", heldout, "eval.max_new_tokens", cfg.eval.new_tokens(cfg.rollout)),
            template=run.template, max_prompt_tokens=cfg.rollout.max_prompt_tokens, overlong=cfg.data.overlong_prompts)
    except DataError as err:
        raise TrainError(str(err)) from None
    if len(train) < cfg.batch.prompts_per_step:
        raise TrainError(f"run.data: {len(train)} prompts, fewer than batch.prompts_per_step "
                         f"{cfg.batch.prompts_per_step}")
    return Inputs(model_dir, hf_dir, train, heldout, run.model is None, reward_kwargs)


__all__ = ["Inputs", "TrainError", "resolve_inputs"]
