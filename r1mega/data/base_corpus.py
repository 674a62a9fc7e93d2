"""The embedded default's task and the corpus its base model is pretrained on (nothing downloaded).

The task: two-digit addition, asked in the DeepSeek-R1-Zero template; the rewards are answer
accuracy (math-verify) and the strict R1-Zero format. The held-out problems are the arithmetic
generator's "test" split (r1mega.data.synthetic: a hash of the problem), never seen in
pretraining or RL.

The corpus is what R1-Zero starts from, in miniature: documents that show the format and the
column method but whose final answers are often wrong. Each document is an R1-Zero prompt and a
compact completion ``<think> 8+7=15 6+5+1=12 </think> <answer> 125 </answer>``; in a share
`noise` of them the final answer carries one ten too many (135) while the column sums stay
right. A model pretrained on it writes well-formed completions and computes the columns, but its
answer is the right one or the slip about equally often, and nothing but a reward tells it which:
the state in which GRPO with rule rewards has something to learn. (A single systematic slip, not
random offsets: with several offsets a wrong column sum plus a slip often lands on the right
answer, so the reward would also reinforce wrong reasoning; measured, such a base collapsed.)
"""

from __future__ import annotations

import random
from typing import Optional

from r1mega.data.records import PromptRecord
from r1mega.data.synthetic import split_of
from r1mega.templates import r1_zero_prompt

SLIP = 10  # the wrong answers carry one ten too many


def problems(split: str, n: Optional[int] = None, *, seed: int) -> list[PromptRecord]:
    """Two-digit additions a + b (a >= b, both 10..99) of `split` ("train" or "test"), shuffled by
    `seed`; the first n (all when None). The split is the arithmetic generator's: a hash of the
    problem's canonical key, so no problem is ever in both."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out = []
    for a in range(10, 100):
        for b in range(10, a + 1):
            if split_of(f"arithmetic:add:{a},{b}") == split:
                out.append(PromptRecord(id=f"add2-{a}-{b}", prompt=f"What is {a} + {b}?", task="math",
                                        answer=str(a + b), language="en",
                                        meta={"generator": "r1mega.data.base_corpus", "op": "add",
                                              "operands": [a, b], "split": split}))
    random.Random(f"r1mega.base_corpus/{split}/{seed}").shuffle(out)
    return out if n is None else out[:n]


def column_steps(operands: list[int]) -> str:
    """``8+7=15 6+5+1=12``: each column from the ones place, with its carry."""
    parts, carry = [], 0
    for i in range(max(len(str(x)) for x in operands)):
        digits = [x // 10 ** i % 10 for x in operands]
        total = sum(digits) + carry
        parts.append("+".join(map(str, digits + ([carry] if carry else []))) + f"={total}")
        carry = total // 10
    return " ".join(parts)


def completion(record: PromptRecord, answer: str | None = None) -> str:
    """The compact R1-Zero completion of `record` (with `answer` instead of the true one)."""
    answer = record.answer if answer is None else answer
    return f" <think> {column_steps(record.meta['operands'])} </think> <answer> {answer} </answer>"


def corpus(records: list[PromptRecord], *, noise: float, seed: int) -> list[str]:
    """R1-Zero prompt + compact completion per record; a share `noise` with a wrong answer."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise!r}")
    rng = random.Random(seed)
    texts = []
    for r in records:
        answer = r.answer
        if rng.random() < noise:
            answer = str(int(answer) + SLIP)
        texts.append(r1_zero_prompt(r.prompt) + completion(r, answer))
    return texts
