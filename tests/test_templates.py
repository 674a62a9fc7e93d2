"""Prompt templates: R1-Zero verbatim, the tokenizer's chat template, the R1 completion format."""

from __future__ import annotations

import pytest

from r1mega.rewards import format_reward, language_consistency, math_accuracy
from r1mega.templates import (
    PROMPT_TEMPLATES,
    R1_ZERO_TEMPLATE,
    chat_prompt,
    r1_zero_prompt,
    render_prompt,
    render_r1_completion,
    split_r1_completion,
)

# Table 1 of the DeepSeek-R1 paper, character for character.
PAPER_R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
    "answer here </answer>. User: prompt. Assistant:"
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    " <think></think>{% endif %}{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer built in memory: no download, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"] + "what is 1 + 2 ?".split()
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = chat_template
    return fast


def test_r1_zero_template_is_the_papers():
    assert R1_ZERO_TEMPLATE.replace("{prompt}", "prompt") == PAPER_R1_ZERO
    assert r1_zero_prompt("prompt") == PAPER_R1_ZERO


def test_r1_zero_prompt_keeps_the_question_verbatim():
    question = "What is $\\frac{1}{2} + {x}$?"
    text = r1_zero_prompt(question)
    assert text.endswith(f"User: {question}. Assistant:")  # the paper's period, even after "?"
    assert text.count("{") == question.count("{")  # braces are not format fields
    with pytest.raises(ValueError, match="prompt"):
        r1_zero_prompt(None)


def test_chat_prompt_uses_the_tokenizers_template():
    tokenizer = tiny_tokenizer()
    assert chat_prompt(tokenizer, "what is 1 + 2 ?") == "<|user|> what is 1 + 2 ? </s> <|assistant|>"
    assert chat_prompt(tokenizer, "what is 1 + 2 ?", system="be brief") == (
        "<|system|> be brief </s> <|user|> what is 1 + 2 ? </s> <|assistant|>")
    # Extra template variables pass through (Qwen3-style enable_thinking).
    assert chat_prompt(tokenizer, "hi", enable_thinking=False).endswith("<|assistant|> <think></think>")
    # Rendered text holds the special tokens: tokenize it without adding more.
    ids = tokenizer(chat_prompt(tokenizer, "what is 1 + 2 ?"), add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[-1] == "<|assistant|>"


def test_chat_prompt_without_chat_template_is_a_clear_error():
    with pytest.raises(ValueError, match="no chat template.*r1_zero"):
        chat_prompt(tiny_tokenizer(chat_template=None), "hi")


def test_render_prompt_dispatch():
    tokenizer = tiny_tokenizer()
    assert set(PROMPT_TEMPLATES) == {"r1_zero", "chat", "raw"}
    assert render_prompt("q", "r1_zero") == r1_zero_prompt("q")
    assert render_prompt("q", "chat", tokenizer=tokenizer) == chat_prompt(tokenizer, "q")
    assert render_prompt("q", "raw") == "q"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("q", "chat")
    with pytest.raises(ValueError, match="template must be one of"):
        render_prompt("q", "r1")


def test_r1_completion_format():
    text = render_r1_completion("  Add 1 and 2.  ", "1 + 2 = 3.", answer="3")
    assert text == "<think>\nAdd 1 and 2.\n</think>\n\n1 + 2 = 3.\n\nThe final answer is $\\boxed{3}$."
    assert split_r1_completion(text) == ("Add 1 and 2.", "1 + 2 = 3.\n\nThe final answer is $\\boxed{3}$.")
    assert render_r1_completion("r", "s") == "<think>\nr\n</think>\n\ns"
    assert render_r1_completion("r", "", answer="1") == "<think>\nr\n</think>\n\nThe final answer is $\\boxed{1}$."
    assert split_r1_completion("no think block") == (None, "no think block")
    with pytest.raises(ValueError, match="summary must not contain"):
        render_r1_completion("r", "a </think> b")


def test_r1_completion_is_read_by_the_rewards():
    text = render_r1_completion("We need half of one. 一半", "Half of one is one half.", answer="\\frac{1}{2}")
    assert math_accuracy(text, "0.5") == 1.0
    assert format_reward(text, answer=None) == 1.0
    assert language_consistency(text, "en") == pytest.approx(5 / 7)  # 5 words + 2 Han in the reasoning
