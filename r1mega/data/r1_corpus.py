"""The embedded default's data for the R1 stages (nothing downloaded): two languages, a cold-start
set, general prompts with rule-checkable preferences.

* Reasoning problems: the base corpus's two-digit additions (r1mega.data.base_corpus, the same
  train / test split), asked in English ("What is 68 + 57?") or Chinese ("请计算 68 + 57?",
  "please compute 68 + 57"), alternately; ``record.language`` is the prompt's language, the
  language the chain of thought should be in. Both prompts end with the operands and "?", as the
  base corpus's prompts do: the base model learned to read the digits at that distance from the
  end of the prompt. Measured on a base pretrained with one thread: with "68 + 57 等于多少？"
  (fifteen byte tokens after the operands) the cold-started model read the Chinese prompts'
  digits right in 9 of 50 held-out problems and its held-out pass@1 was 0.087; with this prompt,
  47 of 50 and 0.698, the same SFT otherwise.
* R1-format completions: a short readable chain of thought in the prompt's language, then a
  summary with the boxed answer::

      <think>
      8+7=15 6+5+1=12 so
      </think>

      The final answer is $\\boxed{125}$.

  (Chinese: ``8+7=15 6+5+1=12 所以`` / ``答案是 $\\boxed{125}$。``): the column sums are
  the base corpus's, which the base model already writes; the words around them carry the
  language.
* The cold-start set (stage 1): such completions, all correct, where a share ``mix`` of the
  chains of thought end in the other language ("... so" written "... 所以" after an English
  prompt, "... 所以" written "... so" after a Chinese one): the language mixing
  DeepSeek-R1 saw in R1-Zero's outputs and removed with the language-consistency reward. A
  model fine-tuned on it mixes languages in about that share; stage 2's reward is what should
  bring it down.
* General prompts (task "general", no rule reward; the reward model scores them in stage 4) of
  two families whose preference a rule decides: "repeat" (say a word n times; the right count
  is preferred over one more and one fewer) and "greet" (greet in the language asked for; the
  right language is preferred).
  :func:`preference_pairs` gives (prompt, chosen, rejected) rows for ``r1mega rm``,
  :func:`general_sft_rows` correct R1-format answers for stage 3's general SFT data and
  :func:`judge` the rule itself (a ``r1mega sample --judge``).
"""

from __future__ import annotations

import random
from typing import Optional

from r1mega.data import base_corpus
from r1mega.data.records import PromptRecord
from r1mega.data.synthetic import split_of

WORDS = ("cat", "sun", "tree", "book", "red", "blue", "apple", "river", "stone", "bird", "moon", "fish", "rain",
         "door", "milk", "star", "cup", "hat", "road", "leaf", "snow", "wind", "ship", "bell", "corn", "lamp", "rose",
         "sand", "wolf", "king", "ring", "gold", "bread", "chair", "cloud", "green", "house", "light", "music",
         "night", "paper", "sheep", "table", "train", "water", "horse", "smile")
GREETINGS = {"en": "Hello", "zh": "你好"}
GREET_PROMPTS = {("en", "en"): "Say hello in English.", ("en", "zh"): "Say hello in Chinese.",
                 ("zh", "en"): "用英文打个招呼。", ("zh", "zh"): "用中文打个招呼。"}


def problems(split: str, n: Optional[int] = None, *, seed: int = 0) -> list[PromptRecord]:
    """The base corpus's additions of `split`, every other one asked in Chinese."""
    out = []
    for i, r in enumerate(base_corpus.problems(split, seed=seed)):
        a, b = r.meta["operands"]
        language = "zh" if i % 2 else "en"
        prompt = f"What is {a} + {b}?" if language == "en" else f"请计算 {a} + {b}?"
        out.append(PromptRecord(id=f"{r.id}-{language}", prompt=prompt, task="math", answer=r.answer,
                                language=language, meta={**r.meta, "generator": "r1mega.data.r1_corpus"}))
    return out if n is None else out[:n]


def reasoning(operands: list[int], language: str, *, mixed: bool = False) -> str:
    """The chain of thought for a + b in `language`: the base corpus's column sums, then a word of
    the language; `mixed`: that word in the other language.

    The sums come first, exactly where the base corpus has them: a word before them (measured:
    "add 8+7=15 ...") moves the digits the base model learned to copy and the cold-started
    model's held-out pass@1 fell from 0.60 to 0.30 after the same SFT."""
    last = {"en": "so", "zh": "所以"}[("zh" if language == "en" else "en") if mixed else language]
    return f"{base_corpus.column_steps(operands)} {last}"


def completion(record: PromptRecord, *, mixed: bool = False) -> str:
    """The R1-format completion of a problem of :func:`problems`: think block, then the summary
    with the boxed answer, spaced like the base corpus (`` <think> ... </think> ...``)."""
    summary = "The final answer is" if record.language == "en" else "答案是"
    end = "." if record.language == "en" else "。"
    think = reasoning(record.meta["operands"], record.language, mixed=mixed)
    return f" <think> {think} </think> {summary} $\\boxed{{{record.answer}}}${end}"


def cold_start_rows(n: int = 2000, *, mix: float = 0.5, seed: int = 0) -> list[dict]:
    """`n` SFT rows (prompt, completion, language, mixed) from the train split; a share `mix`
    with a chain of thought that ends in the other language."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix!r}")
    rng = random.Random(f"r1mega.r1_corpus/cold/{seed}")
    records = problems("train", seed=seed + 1)[:n]
    rows = []
    for r in records:
        mixed = rng.random() < mix
        rows.append({"id": f"cold-{r.id}", "prompt": r.prompt, "completion": completion(r, mixed=mixed),
                     "task": r.task, "language": r.language, "mixed": mixed})
    return rows


# ---- general prompts ---------------------------------------------------------------------------
def general_prompts(split: str, n: Optional[int] = None, *, seed: int = 0) -> list[PromptRecord]:
    """General prompts of `split` ("repeat" and "greet" families), shuffled by `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out = []
    for word in WORDS:
        for count in range(2, 7):
            if split_of(f"general:repeat:{word}:{count}") == split:
                out.append(PromptRecord(id=f"repeat-{word}-{count}", prompt=f"Repeat the word {word} {count} times.",
                                        task="general", language="en",
                                        meta={"family": "repeat", "word": word, "count": count}))
    for (asked_in, target), prompt in GREET_PROMPTS.items():
        for variant in range(24):  # the same request under two dozen ids: the family weighs in the mix
            if split_of(f"general:greet:{asked_in}:{target}:{variant}") == split:
                out.append(PromptRecord(id=f"greet-{asked_in}-{target}-{variant}", prompt=prompt, task="general",
                                        language=asked_in, meta={"family": "greet", "target": target}))
    random.Random(f"r1mega.r1_corpus/general/{split}/{seed}").shuffle(out)
    return out if n is None else out[:n]


def response(record: PromptRecord) -> str:
    """The right answer to a general prompt (the summary of its R1-format completion)."""
    m = record.meta
    if m["family"] == "repeat":
        return " ".join([m["word"]] * m["count"])
    return GREETINGS[m["target"]]


def general_completion(record: PromptRecord, text: Optional[str] = None) -> str:
    m = record.meta
    if m["family"] == "repeat":
        thought = f"say {m['word']} {m['count']} times" if record.language == "en" else f"重复 {m['count']} 次"
    else:
        thought = "greet in " + ("English" if m["target"] == "en" else "Chinese") if record.language == "en" \
            else "用" + ("英文" if m["target"] == "en" else "中文") + "问候"
    # Spaced like the math completions (and the base corpus), not render_r1_completion's newlines:
    # one layout of the think block across tasks, in tokens the base model knows (measured: with
    # the newlines, stage 3's SFT loss ended at 0.36 and its held-out pass@1 at 0.41).
    return f" <think> {thought} </think> {response(record) if text is None else text}"


def general_sft_rows(records: list[PromptRecord]) -> list[dict]:
    """Correct R1-format answers to general prompts (stage 3's general SFT data)."""
    return [{"id": f"general-{r.id}", "prompt": r.prompt, "completion": general_completion(r), "task": r.task,
             "language": r.language} for r in records]


def preference_pairs(records: list[PromptRecord], *, seed: int = 0) -> list[dict]:
    """(prompt, chosen, rejected) rows: the right answer over a wrong one, both R1-format."""
    rows = []
    for r in records:
        m = r.meta
        wrong = ([" ".join([m["word"]] * c) for c in (m["count"] - 1, m["count"] + 1)] if m["family"] == "repeat"
                 else [GREETINGS["zh" if m["target"] == "en" else "en"]])
        for i, text in enumerate(wrong):
            rows.append({"id": f"pair-{r.id}-{i}", "prompt": r.prompt, "chosen": general_completion(r),
                         "rejected": general_completion(r, text), "family": m["family"]})
    random.Random(f"r1mega.r1_corpus/pairs/{seed}").shuffle(rows)
    return rows


def judge(record: PromptRecord, completion: str) -> bool:
    """Whether a completion's summary is the right answer to a general prompt of this module."""
    summary = completion[completion.rfind("</think>") + len("</think>"):] if "</think>" in completion else completion
    return summary.strip().rstrip(".。!！") == response(record)
