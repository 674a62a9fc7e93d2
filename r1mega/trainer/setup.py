"""Everything a GRPO run holds, built once before the first step (or restored from a checkpoint).

:func:`setup_run` reads the inputs (checked before any work), the policy (or the checkpoint it
resumes), the reference policy when the loss has a KL term, the rollout engines on their ranks
with their colocation, the reward scorer on rank 0, the prompt sampler and the run log, and
returns them as one :class:`GRPORun`, the state the phases of :mod:`r1mega.trainer.phases` share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from r1mega.algo import LossSpec
from r1mega.config import Config
from r1mega.data import PromptSampler
from r1mega.data.loader import write_prompts
from r1mega.evaluation import CompletionScorer
from r1mega.models import load_policy
from r1mega.parallel.collectives import engine_ranks
from r1mega.rewards import RewardModel, RewardPool
from r1mega.rewards.routing import RoutedRewards
from r1mega.rollout.refit import Colocation, build_colocation
from r1mega.run.logs import EVAL, METRICS, SAMPLES, RunLog, truncate_after
from r1mega.run.rundir import quiet_known_warnings, resume_source
from r1mega.trainer.inputs import Inputs, TrainError, resolve_inputs


@dataclass
class GRPORun:
    """The run's objects and its progress. Ranks without an engine hold ``engine=None``; only
    rank 0 holds the reward scorer (``scorer``) and writes the run directory."""

    cfg: Config
    inputs: Inputs
    run_dir: Path
    tokenizer: Any
    policy: Any
    reference: Any  # None without a KL term
    loss_spec: LossSpec
    engines: list[int]  # the ranks hosting an engine
    engine: Any
    colocation: Colocation
    scorer: Any  # RewardPool (or RoutedRewards with a reward model) on rank 0, else None
    eval_scorer: Optional[CompletionScorer]  # the held-out evaluation's, on rank 0 when there are held-out prompts
    sampler: PromptSampler
    log: RunLog
    rank0: bool
    start_step: int
    inputs_s: float  # seconds spent reading the inputs (and building the embedded base model)
    data_state: Optional[dict] = None  # what the newest checkpoint saved besides the weights
    evals: dict = field(default_factory=dict)  # held-out results by step
    phase_seconds: dict = field(default_factory=dict)  # the phases' seconds over the whole run

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def close(self) -> None:
        self.log.close()
        if self.engine is not None:
            self.engine.close()
        for scorer in (self.scorer, self.eval_scorer):
            if scorer is not None:
                scorer.close()


def reward_scorer(inputs: Inputs, cfg: Config):
    """The rule rewards' pool, with general prompts routed to the reward model when one is set."""
    kwargs = dict(inputs.reward_pool_kwargs)
    pool = RewardPool(kwargs.pop("weights"), **kwargs)
    if cfg.rewards.reward_model is None:
        return pool
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return RoutedRewards(pool, RewardModel(cfg.rewards.reward_model, device=device), cfg.rewards.reward_model_weight)


def setup_run(cfg: Config, resume: Optional[str | Path] = None) -> GRPORun:
    """Build (or restore, with `resume` = a run directory) the run `cfg` describes; collective."""
    import transformers

    wall = time.perf_counter()
    quiet_known_warnings()
    inputs = resolve_inputs(cfg)
    inputs_s = time.perf_counter() - wall
    run_dir = Path(resume) if resume is not None else cfg.run.run_dir
    try:
        resumed_from = resume_source(run_dir, resuming=resume is not None)
    except ValueError as err:
        raise TrainError(str(err)) from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(inputs.hf_dir))
    rollout_cfg = cfg.rollout
    policy = load_policy(resumed_from or inputs.model_dir, parallel=cfg.parallel, optim=cfg.optim,
                         temperature=rollout_cfg.temperature, seed=cfg.run.seed,
                         router_replay=rollout_cfg.router_replay, policy=cfg.policy,
                         total_steps=cfg.run.steps * cfg.batch.minibatches_per_step)
    rank0 = dist.get_rank() == 0
    data_state = policy.data_state if resumed_from is not None else None
    start_step = data_state["step"] if data_state else 0
    reference = None
    if cfg.grpo.kl_coef > 0:
        moved = data_state and data_state.get("reference")  # grpo.ref_update_interval saved a newer one
        reference = load_policy(Path(moved) if moved else inputs.model_dir, parallel=cfg.parallel, trainable=False,
                                temperature=rollout_cfg.temperature, seed=cfg.run.seed, load_optimizer=False,
                                policy=cfg.policy)
    engines = engine_ranks(policy.layout)
    colocation = build_colocation(policy, rollout_cfg, engine_ranks=engines, hf_dir=inputs.hf_dir, seed=cfg.run.seed)
    sampler = PromptSampler(inputs.train, batch_size=cfg.batch.prompts_per_step, seed=cfg.run.seed)
    if data_state:
        sampler.load_state_dict(data_state["sampler"])
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir)
        for name in (METRICS, SAMPLES, EVAL):
            truncate_after(run_dir / name, start_step - 1)
        if inputs.heldout:
            write_prompts(run_dir / "heldout.jsonl", inputs.heldout)
    log = RunLog(run_dir, enabled=rank0, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, config=cfg.to_dict(),
                 total_steps=cfg.run.steps)
    return GRPORun(
        cfg=cfg, inputs=inputs, run_dir=run_dir, tokenizer=tokenizer, policy=policy, reference=reference,
        loss_spec=cfg.grpo.loss_spec(max_new_tokens=rollout_cfg.max_new_tokens, has_reference=reference is not None),
        engines=engines, engine=colocation.engine, colocation=colocation,
        scorer=reward_scorer(inputs, cfg) if rank0 else None,
        eval_scorer=CompletionScorer(tokenizer, format_style=cfg.rewards.format_style, workers=cfg.rewards.workers or None,
                                     timeout_s=cfg.rewards.timeout_s) if rank0 and inputs.heldout else None,
        sampler=sampler, log=log, rank0=rank0,
        start_step=start_step, inputs_s=inputs_s, data_state=data_state,
        evals=dict(data_state.get("evals", {})) if data_state else {},
        phase_seconds=dict(data_state.get("phase_seconds", {})) if data_state else {})


__all__ = ["GRPORun", "reward_scorer", "setup_run"]
