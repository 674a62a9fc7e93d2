"""The format reward (R1-Zero tags, R1 summary format) and the language-consistency reward."""

from __future__ import annotations

import pytest

from r1mega.data.records import PromptRecord
from r1mega.rewards import format_reward, format_reward_detailed, get_reward, language_consistency
from r1mega.rewards.language import chain_of_thought, count_words

# ---- format ---------------------------------------------------------------------------------------

GOOD = [
    "<think>reasoning</think><answer>42</answer>",
    "<think> reasoning </think> <answer> 42 </answer>",
    " <think>\nline 1\nline 2\n</think>\n\n<answer>\n42\n</answer>\n",  # after "Assistant:" a space
    "<think>a < b and b > c</think><answer>x<y</answer>",
]

BAD = [
    ("", "occurs 0 times"),
    ("42", "occurs 0 times"),
    ("<think>reasoning</think>", "<answer> occurs 0 times"),  # missing answer
    ("<answer>42</answer>", "<think> occurs 0 times"),  # missing think
    ("<think>reasoning<answer>42</answer>", "</think> occurs 0 times"),  # unclosed think
    ("<think>reasoning</think><answer>42", "</answer> occurs 0 times"),  # truncated answer
    ("<think>a</think><think>b</think><answer>42</answer>", "occurs 2 times"),  # duplicated
    ("<think>a</think><answer>1</answer><answer>2</answer>", "occurs 2 times"),
    ("<think>a<think>b</think>c</think><answer>42</answer>", "occurs 2 times"),  # nested
    ("<think>a <answer>41</answer></think><answer>42</answer>", "occurs 2 times"),  # answer in think
    ("<think>a</think><answer><think>b</think>42</answer>", "occurs 2 times"),  # think in answer
    ("<think>a</think><answer>42</answer> I hope this helps", "text after </answer>"),
    ("<think>a</think><answer>42</answer><|endoftext|>", "text after </answer>"),
    ("Sure! <think>a</think><answer>42</answer>", "text before <think>"),
    ("<think>a</think> so: <answer>42</answer>", "text between </think> and <answer>"),
    ("<answer>42</answer><think>a</think>", "text before <think>"),  # wrong order
    ("</think>a<think><answer>42</answer>", "text before <think>"),
    ("<think>a</think></answer>42<answer>", "text between"),
    ("<think>  </think><answer>42</answer>", "empty think block"),
    ("<think>a</think><answer> \n </answer>", "empty answer block"),
]


@pytest.mark.parametrize("completion", GOOD)
def test_format_good(completion):
    assert format_reward(completion) == 1.0


@pytest.mark.parametrize("completion,reason", BAD)
def test_format_bad(completion, reason):
    out = format_reward_detailed(completion)
    assert out.value == 0.0
    assert reason in out.info["reason"]


def test_format_summary_variant():
    assert format_reward("<think>\nr\n</think>\n\nThe answer is \\boxed{4}.", answer=None) == 1.0
    assert format_reward("<think>r</think>   ", answer=None) == 0.0
    assert format_reward("<think>r</think><think>s</think> summary", answer=None) == 0.0
    assert format_reward("preamble <think>r</think> summary", answer=None) == 0.0


def test_format_prefilled_think_and_custom_tags():
    assert format_reward("reasoning</think><answer>4</answer>", think_prefilled=True) == 1.0
    assert format_reward("<think>reasoning</think><answer>4</answer>", think_prefilled=True) == 0.0
    tags = {"think": ("<reasoning>", "</reasoning>"), "answer": ("<final>", "</final>")}
    assert format_reward("<reasoning>r</reasoning><final>4</final>", **tags) == 1.0
    assert format_reward("<think>r</think><answer>4</answer>", **tags) == 0.0


def test_format_argument_errors():
    with pytest.raises(ValueError, match="think"):
        format_reward("x", think=("<t>",))
    with pytest.raises(ValueError, match="must all differ"):
        format_reward("x", think=("<a>", "</a>"), answer=("<a>", "</b>"))
    with pytest.raises(ValueError, match="completion"):
        format_reward(None)


def test_format_registry_entries():
    record = PromptRecord(id="r", prompt="q", task="math", answer="4")
    assert get_reward("format")(record, GOOD[0]).value == 1.0
    # The summary format: the think block and a non-blank summary after it; for math the summary
    # boxes the final answer (an R1-Zero answer block is not the R1 format).
    assert get_reward("format_summary")(record, "<think>r</think> so it is $\\boxed{4}$.").value == 1.0
    out = get_reward("format_summary")(record, GOOD[0])
    assert out.value == 0.0 and "boxed" in out.info["reason"]
    assert get_reward("format_summary")(record, "<think>r \\boxed{4}</think> 4").value == 0.0
    general = PromptRecord(id="g", prompt="q", task="general")
    assert get_reward("format_summary")(general, "<think>r</think> 4").value == 1.0


# ---- language consistency -----------------------------------------------------------------------


def test_pure_english_and_chinese():
    assert language_consistency("First we add the two numbers, then we divide by three.", "en") == 1.0
    assert language_consistency("First we add the two numbers, then we divide by three.", "zh") == 0.0
    assert language_consistency("我们先把两个数相加，然后除以三。", "zh") == 1.0
    assert language_consistency("我们先把两个数相加，然后除以三。", "en") == 0.0


def test_mixed_text():
    # 2 Latin words, 2 Han characters (each Han character is one word).
    assert language_consistency("Let me 计算", "en") == 0.5
    assert language_consistency("Let me 计算", "zh") == 0.5
    # Script changes split words: 设, 为, 整数 (2) and "integer".
    assert count_words("设n为整数 integer") == {"latin": 1, "han": 4, "other": 0}


def test_other_scripts_count_against():
    assert language_consistency("Привет мир hello", "en") == pytest.approx(1 / 3)
    assert language_consistency("Привет мир 你好", "zh") == pytest.approx(2 / 4)
    assert language_consistency("こんにちは 世界", "zh") == pytest.approx(2 / 3)  # kana run = 1 word
    assert language_consistency("Ελληνικά words", "en") == 0.5


def test_math_digits_and_punctuation_are_neutral():
    assert language_consistency("所以 $x^2 + y^2 = \\frac{a}{b}$ 成立", "zh") == 1.0
    assert language_consistency("所以 x = 3，因此 \\sqrt{2} 成立。", "zh") == 1.0  # one-letter x is a variable
    assert language_consistency("The value is 3.14159 (approx.)!", "en") == 1.0
    assert language_consistency("Compute \\[\\int_0^1 f\\] then \\(g\\) 中", "en") == pytest.approx(2 / 3)
    assert language_consistency("Café déjà vu", "en") == 1.0  # Latin script, accents included
    # Dollar signs across lines are prices, not math: the words between them still count.
    assert count_words("It costs $5.\n所以我们 pay $6.")["han"] == 4


def test_empty_and_wordless_text_score_zero():
    assert language_consistency("", "en") == 0.0
    assert language_consistency("", "zh") == 0.0
    assert language_consistency("1 + 2 = 3 $x$", "en") == 0.0


def test_only_the_chain_of_thought_is_scored():
    completion = "<think>我们计算一下</think> <answer>The answer is forty two</answer>"
    assert language_consistency(completion, "zh") == 1.0
    assert chain_of_thought(completion).strip() == "我们计算一下"
    # A truncated completion: everything after <think>.
    assert language_consistency("<think>we compute 中", "en") == pytest.approx(2 / 3)
    # A prompt ending with <think>: everything before </think>.
    assert language_consistency("we compute</think> 答案", "en") == 1.0


def test_language_argument_and_registry():
    with pytest.raises(ValueError, match="lang"):
        language_consistency("text", "fr")
    language = get_reward("language")
    record = PromptRecord(id="l", prompt="q", task="math", answer="1", language="zh")
    assert language(record, "<think>我们计算 then</think>").value == pytest.approx(4 / 5)
    skipped = language(PromptRecord(id="n", prompt="q", task="math", answer="1"), "anything")
    assert skipped.skipped and skipped.value == 0.0 and "language is None" in skipped.info["skipped"]
