"""RewardModel on a tiny random sequence-classification model saved to a temporary directory."""

from __future__ import annotations

import pytest
import torch

from r1mega.rewards import RewardModel

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + (
    "what is one plus two three four the answer think </think> <think> hello world a b c".split())
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"

PROMPTS = ["what is one plus two", "hello", "what is the answer", "a b c", "what is four"]
COMPLETIONS = ["three", "hello world hello world hello world", "<think> four </think> the answer is four",
               "c b a c b a", "four"]


def tiny_tokenizer(*, pad: bool, chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": "<pad>"} if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", **kwargs)
    fast.chat_template = chat_template
    return fast


def save_tiny_model(path, *, pad: bool, chat_template: str | None, num_labels: int = 1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         num_labels=num_labels, pad_token_id=1 if pad else None)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a random init leaves the score head near 0; make scores differ clearly
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tiny_tokenizer(pad=pad, chat_template=chat_template).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rm_chat"), pad=True, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    # No pad token anywhere, no chat template: the pool pads with eos and concatenates the texts.
    return save_tiny_model(tmp_path_factory.mktemp("rm_plain"), pad=False, chat_template=None)


def direct_scores(rm: RewardModel, prompts, completions):
    """One unpadded forward per pair, written out independently of RewardModel.score."""
    out = []
    for prompt, completion in zip(prompts, completions):
        if rm.use_chat_template:
            text = rm.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                tokenize=False)
            ids = rm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = rm.tokenizer(prompt + completion, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(float(rm.model(input_ids=ids).logits[0, 0]))
    return out


@pytest.mark.parametrize("which", ["chat_model_dir", "plain_model_dir"])
def test_scores_equal_a_direct_forward(which, request):
    rm = RewardModel(request.getfixturevalue(which), batch_size=5)
    assert rm.use_chat_template == (which == "chat_model_dir")
    assert not rm.model.training
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(direct_scores(rm, PROMPTS, COMPLETIONS), abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # distinct: order is checked too


@pytest.mark.parametrize("which", ["chat_model_dir", "plain_model_dir"])
def test_batch_invariance(which, request):
    rm = RewardModel(request.getfixturevalue(which), batch_size=5)
    batched = rm.score(PROMPTS, COMPLETIONS)
    rm.batch_size = 1
    one_by_one = rm.score(PROMPTS, COMPLETIONS)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    rm.batch_size = 2  # uneven batches, sorted by length, results back in input order
    assert rm.score(PROMPTS[::-1], COMPLETIONS[::-1]) == pytest.approx(one_by_one[::-1], abs=1e-5)


def test_padding_setup(plain_model_dir, chat_model_dir):
    plain = RewardModel(plain_model_dir)
    assert plain.pad_id == plain.tokenizer.eos_token_id == plain.model.config.pad_token_id
    chat = RewardModel(chat_model_dir)
    assert chat.pad_id == 1 == chat.tokenizer.pad_token_id


def test_summary_only_and_truncation(chat_model_dir):
    rm = RewardModel(chat_model_dir, summary_only=True)
    assert rm.text("q", "<think> long reasoning </think> the answer") == rm.text("q", "the answer")
    rm = RewardModel(chat_model_dir, max_length=6)
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert rm.last_truncated == 5
    # Truncation keeps the last tokens.
    ids = rm.token_ids(PROMPTS[0], COMPLETIONS[0])[-6:]
    with torch.no_grad():
        expected = float(rm.model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_errors(tmp_path, chat_model_dir):
    with pytest.raises(ValueError, match="not a directory"):
        RewardModel(tmp_path / "missing")
    with pytest.raises(ValueError, match="batch_size"):
        RewardModel(chat_model_dir, batch_size=0)
    rm = RewardModel(chat_model_dir)
    with pytest.raises(ValueError, match="same length"):
        rm.score(["a"], [])
    with pytest.raises(ValueError, match=r"completions\[0\]"):
        rm.score(["a"], [None])
    assert rm.score([], []) == []


def test_several_labels_need_a_label_index(tmp_path):
    path = save_tiny_model(tmp_path / "two", pad=True, chat_template=None, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel(path)
    rm = RewardModel(path, label=1)
    ids = rm.token_ids("hello", "world")
    with torch.no_grad():
        expected = float(rm.model(input_ids=torch.tensor([ids])).logits[0, 1])
    assert rm.score(["hello"], ["world"]) == pytest.approx([expected], abs=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu(chat_model_dir):
    cpu = RewardModel(chat_model_dir).score(PROMPTS, COMPLETIONS)
    cuda = RewardModel(chat_model_dir, device="cuda", batch_size=2).score(PROMPTS, COMPLETIONS)
    assert cuda == pytest.approx(cpu, abs=1e-3)  # TF32/kernel differences only
