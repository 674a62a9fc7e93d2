"""Evaluation by R1's protocol: one evaluator (:func:`evaluate_prompts`) behind ``r1mega eval``
(:func:`evaluate_model`) and the trainer's held-out evaluation; pass@k and cons@k metrics."""

from r1mega.evaluation.generation import (
    CompletionScorer,
    GenerationError,
    ScoredSampler,
    checkpoint_buckets,
    stop_token_ids,
)
from r1mega.evaluation.metrics import cons_at_k, majority_index, mean, paired_difference, pass_at_k
from r1mega.evaluation.run import (
    SUMMARY_KEYS,
    EvalError,
    EvalSettings,
    evaluate_model,
    evaluate_prompts,
    fit_eval_problems,
    load_eval_problems,
    summary_table,
    write_results,
)

__all__ = ["SUMMARY_KEYS", "CompletionScorer", "EvalError", "EvalSettings", "GenerationError", "ScoredSampler",
           "checkpoint_buckets", "cons_at_k", "evaluate_model", "evaluate_prompts", "fit_eval_problems", "load_eval_problems",
           "majority_index", "mean", "paired_difference", "pass_at_k", "stop_token_ids", "summary_table", "write_results"]
