"""Prompt files checked against a model's budget when they load, before the model is built (its
tokenizer and its positions only): r1mega.data.fit_prompts under data.overlong_prompts, for every
command that renders prompts (train, eval, sample, distill, the pipeline's stages)."""

from __future__ import annotations

from pathlib import Path

from r1mega.data import DataError, fit_prompts
from r1mega.models.hf_config import describe_hf_model


def fit_to_model(hf_dir: str | Path, *datasets: tuple, template: str, max_prompt_tokens: int,
                 overlong: str) -> list[list]:
    """Each ``(source, records, new_tokens_key, new_tokens)`` with its prompts fitted to the model
    in `hf_dir` under `template`, `max_prompt_tokens` (rollout.max_prompt_tokens) and `overlong`
    (data.overlong_prompts). DataError (one line) for what does not fit, or a template the
    tokenizer cannot render."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    positions = describe_hf_model(hf_dir).max_position_embeddings
    out = []
    for source, records, key, new_tokens in datasets:
        if not records:
            out.append(records)
            continue
        try:
            out.append(fit_prompts(records, tokenizer, template, max_prompt_tokens=max_prompt_tokens,
                                   new_tokens=new_tokens, max_positions=positions, overlong=overlong,
                                   source=str(source), new_tokens_key=key))
        except DataError:
            raise
        except ValueError as err:  # a template the tokenizer cannot render (chat without a chat template)
            raise DataError(f"run.template: {err}") from None
    return out


__all__ = ["fit_to_model"]
