"""Evaluation: pass@k and cons@k metrics, and ``r1mega eval`` (a model on problems with gold answers)."""

from r1mega.evaluation.generation import GenerationError, ScoredSampler, checkpoint_buckets
from r1mega.evaluation.metrics import cons_at_k, majority_index, mean, pass_at_k
from r1mega.evaluation.run import (
    EvalError,
    EvalSettings,
    evaluate_model,
    load_eval_problems,
    summary_table,
    write_results,
)

__all__ = ["EvalError", "EvalSettings", "GenerationError", "ScoredSampler", "checkpoint_buckets", "cons_at_k", "evaluate_model", "load_eval_problems",
           "majority_index", "mean", "pass_at_k", "summary_table", "write_results"]
