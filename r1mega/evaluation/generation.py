"""A Hugging Face model directory as a sampler of scored completions: the ``hf`` rollout engine
(weights read from the directory's safetensors) and the reward pool. Shared by ``r1mega eval``
and ``r1mega sample`` (rejection sampling)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from r1mega.templates import render_prompts


class GenerationError(ValueError):
    """A bad model directory or prompt; the message is one line."""


def checkpoint_buckets(model_dir: str | Path, bucket_bytes: int = 256 << 20) -> Iterator[list]:
    """(name, tensor) buckets of every tensor in the directory's safetensors files."""
    from safetensors import safe_open

    bucket, size = [], 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                bucket.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
    if bucket:
        yield bucket


class ScoredSampler:
    """Completions of prompt records from `model_dir`, each scored by accuracy, the format reward
    of `format_style` ("answer-tags" or "summary") and language consistency.

    Each completion is a dict: ``sample_index``, ``completion`` (text, special tokens dropped),
    ``tokens``, ``finish_reason``, ``errors`` ({reward: message} for rewards that failed), and
    per reward its value, None when it failed or does not apply (language: the record names no
    language, or the reasoning has no words).
    """

    def __init__(self, model_dir: str | Path, *, template: str = "r1_zero", max_prompt_tokens: int = 2048,
                 format_style: str = "answer-tags", seed: int = 0, workers: Optional[int] = None,
                 timeout_s: float = 10.0):
        import transformers

        from r1mega.rewards import RewardPool
        from r1mega.rollout.hf_engine import HFEngine

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise GenerationError(f"--model: {str(model_dir)!r} is not a Hugging Face model directory (no config.json)")
        self.template, self.max_prompt_tokens = template, max_prompt_tokens
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.model_dir))
        self.format_name = "format" if format_style == "answer-tags" else "format_summary"
        self.weights = {"accuracy": 1.0, self.format_name: 1.0, "language": 1.0}
        self.engine = HFEngine(self.model_dir, tokenizer=self.tokenizer, seed=seed)
        self.engine.refit(checkpoint_buckets(self.model_dir))
        self.pool = RewardPool(self.weights, workers=workers, timeout_s=timeout_s)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return (eos,) if eos is not None else ()

    def prompt_ids(self, records: Sequence) -> list[list[int]]:
        """Token ids of each record's templated prompt; GenerationError naming a prompt too long."""
        try:
            return render_prompts(records, self.tokenizer, self.template, self.max_prompt_tokens)
        except ValueError as err:
            raise GenerationError(str(err)) from None

    def run(self, records: Sequence, prompt_ids: Sequence[Sequence[int]], params, *,
            first_prompt_index: int = 0) -> list[list[dict[str, Any]]]:
        """params.n scored completions per record (a list per record, in sample order)."""
        completions = self.engine.generate(list(prompt_ids), params, first_prompt_index=first_prompt_index)
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        owners = [records[c.prompt_index - first_prompt_index] for c in completions]
        scored = self.pool.score(owners, texts)
        out: list[list[dict[str, Any]]] = [[] for _ in records]
        for c, text, s in zip(completions, texts, scored):
            entry = {"sample_index": c.sample_index, "completion": text, "tokens": len(c.token_ids),
                     "finish_reason": c.finish_reason, "errors": dict(s.errors),
                     **{name: (None if name in s.errors else s.values.get(name)) for name in self.weights}}
            if (s.info.get("language") or {}).get("words") == 0 or (s.info.get("language") or {}).get("skipped"):
                entry["language"] = None  # no target language, or no words in the reasoning
            out[c.prompt_index - first_prompt_index].append(entry)
        return out

    def close(self) -> None:
        self.engine.close()
        self.pool.close()

    def __enter__(self) -> "ScoredSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["GenerationError", "ScoredSampler", "checkpoint_buckets"]
