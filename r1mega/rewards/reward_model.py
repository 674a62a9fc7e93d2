"""A learned reward model: scores (prompt, completion) pairs with a local Hugging Face
sequence-classification model (DeepSeek-R1's last RL stage scores general prompts this way).

Input text: with a chat template, the tokenizer renders ``[user: prompt, assistant: completion]``
and the result is tokenized without adding special tokens (the template has them); without one,
the text is ``prompt + completion`` tokenized with the tokenizer's special tokens.
``summary_only=True`` scores only the text after the last ``</think>`` (R1 judges helpfulness on
the summary alone).

Pooling is the model's own (transformers' sequence-classification heads read the logit at the
last token that is not ``config.pad_token_id``), so the scores are those of a direct forward of
each pair. Batches are right-padded with ``config.pad_token_id`` (set from the tokenizer's pad,
else its eos or unk, when the config has none): right padding keeps each sequence's positions
and, with causal attention, its hidden states equal to an unpadded forward, so a score does not
depend on the batch it lands in. Pairs are batched by length to reduce padding; results keep
input order.

Pairs longer than ``max_length`` tokens keep their last ``max_length`` tokens: the end of the
completion is what a reward model must see (the count of truncated pairs is in
``last_truncated``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch


class RewardModel:
    """Scores (prompt, completion) pairs with a sequence-classification model directory.

    Args:
        path: a local directory holding the model (config, weights) and its tokenizer; loaded
            with ``local_files_only=True``, never downloaded.
        batch_size: pairs per forward.
        device: where the model runs ("cpu", "cuda", "cuda:1", ...).
        max_length: tokens kept per pair (the last ones).
        dtype: the model's parameter dtype (e.g. torch.bfloat16), None for the checkpoint's.
        use_chat_template: render pairs with the tokenizer's chat template; None: when it has one.
        summary_only: score only the completion text after its last ``</think>``.
        label: for a model with several labels, the index of the logit used as the score;
            must be None (the single logit) when ``num_labels == 1``.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 8, device: str | torch.device = "cpu",
                 max_length: int = 4096, dtype: torch.dtype | None = None,
                 use_chat_template: bool | None = None, summary_only: bool = False,
                 label: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"path must be a local model directory, got {str(path)!r} (not a directory)")
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.device = torch.device(device)
        self.summary_only = summary_only
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        kwargs = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, **kwargs)
        self.model.to(self.device).eval()

        num_labels = self.model.config.num_labels
        if num_labels == 1:
            if label not in (None, 0):
                raise ValueError(f"label must be None for a model with num_labels=1, got {label!r}")
            label = 0
        elif label is None or isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"the model at {str(path)!r} has num_labels={num_labels}: pass label= the "
                             f"index (0..{num_labels - 1}) of the logit to use as the score, got {label!r}")
        self.label = label

        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if use_chat_template is None:
            use_chat_template = has_template
        elif use_chat_template and not has_template:
            raise ValueError(f"use_chat_template=True but the tokenizer at {str(path)!r} has no chat template")
        self.use_chat_template = use_chat_template

        config = self.model.config
        pad_id = getattr(config, "pad_token_id", None)
        if pad_id is None:
            for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                              self.tokenizer.unk_token_id):
                if candidate is not None:
                    pad_id = candidate
                    break
            if pad_id is None:
                raise ValueError(f"the model at {str(path)!r} has no pad_token_id and its tokenizer no "
                                 "pad, eos or unk token to pad batches with")
            # The head finds each sequence's last token by this id, so it must be the padding id.
            config.pad_token_id = pad_id
        self.pad_id = int(pad_id)
        self.last_truncated = 0

    def text(self, prompt: str, completion: str) -> str:
        """The text the model scores for one pair (see the module docstring)."""
        if self.summary_only:
            end = completion.rfind("</think>")
            if end >= 0:
                completion = completion[end + len("</think>"):].lstrip()
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    def token_ids(self, prompt: str, completion: str) -> list[int]:
        """Token ids of one pair, before truncation."""
        return list(self.tokenizer(self.text(prompt, completion),
                                   add_special_tokens=not self.use_chat_template)["input_ids"])

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The reward of each (prompt, completion) pair, in order: the chosen logit, as a float.

        Raises ValueError if the lengths differ, an element is not a str or a pair has no tokens.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must have the same length, got "
                             f"{len(prompts)} and {len(completions)}")
        for name, items in (("prompts", prompts), ("completions", completions)):
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise ValueError(f"{name}[{i}] must be a str, got {type(item).__name__}")
        ids = [self.token_ids(p, c) for p, c in zip(prompts, completions)]
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"pair {i} (prompt and completion) has no tokens to score")
        self.last_truncated = sum(len(x) > self.max_length for x in ids)
        ids = [x[-self.max_length:] for x in ids]
        order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
        scores = [math.nan] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(ids[k]) for k in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, k in enumerate(batch):
                input_ids[row, :len(ids[k])] = torch.tensor(ids[k], dtype=torch.long)
                attention_mask[row, :len(ids[k])] = 1
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device)).logits
            for row, k in enumerate(batch):
                scores[k] = float(logits[row, self.label].float())
        return scores
